"""Type stub of the compiled core (csrc/bindings.cpp). Arrays are DLPack arrays or capsules."""

from typing import Any, Optional

def build_info() -> dict[str, Any]: ...
def verify(
    target_logits: Any, draft_ids: Any, draft_logits: Optional[Any], draft_point_mass: Optional[Any],
    vocab_map: Optional[Any], vocab_inv: Optional[Any], temperature: Optional[Any],
    temperature_value: float, draft_temperature: Optional[Any], draft_temperature_value: float,
    seed: Optional[Any], seed_value: int, offset: int, target_lse: Optional[Any],
    draft_lse: Optional[Any], top_k: Optional[Any], top_k_value: int, top_p: Optional[Any],
    top_p_value: float, min_p: Optional[Any], min_p_value: float, out_ids: Any,
    out_num_accepted: Any, out_valid: Any, workspace: Optional[Any], stream: int,
) -> None: ...
def verify_tree(
    target_logits: Any, tokens: Any, parents: Any, temperature: Optional[Any],
    temperature_value: float, seed: Optional[Any], seed_value: int, offset: int,
    top_k: Optional[Any], top_k_value: int, top_p: Optional[Any], top_p_value: float,
    min_p: Optional[Any], min_p_value: float, out_ids: Any, out_num_accepted: Any, out_path: Any,
    out_valid: Any, stream: int,
) -> None: ...
def linear_f32(x: Any, w_packed: Any, out: Any, threads: int = 1, use_simd: bool = True) -> None: ...
def _linear_f32_np(x: Any, w_packed: Any, out: Any, threads: int = 1) -> None: ...
def linear_simd() -> bool: ...
def gather_logprobs(
    logits: Any, ids: Any, temperature: Optional[Any], temperature_value: float, out_lse: Any,
    out_logprobs: Any, workspace: Optional[Any], stream: int,
) -> None: ...
def denoise_step(
    logits: Any, tokens: Any, commit_step: Any, step: int, num_steps: int, mode: int,
    vocab_map: Optional[Any], temperature: Optional[Any], temperature_value: float,
    seed: Optional[Any], seed_value: int, offset: int, out_tokens: Any, out_commit_step: Any,
    out_lse: Any, out_valid: Any, workspace: Optional[Any], stream: int,
) -> None: ...
def filter_logits(
    logits: Any, temperature: Optional[Any], temperature_value: float, top_k: Optional[Any],
    top_k_value: int, top_p: Optional[Any], top_p_value: float, min_p: Optional[Any],
    min_p_value: float, out: Any, stream: int,
) -> None: ...
def apply_penalties(
    logits: Any, ids: Any, lengths: Any, repetition: Optional[Any], repetition_value: float,
    presence: Optional[Any], presence_value: float, frequency: Optional[Any],
    frequency_value: float, out: Any, workspace: Optional[Any], stream: int,
) -> None: ...
def check_sampling(
    temperature: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
    min_p: Optional[float] = None, repetition_penalty: Optional[float] = None,
    presence_penalty: Optional[float] = None, frequency_penalty: Optional[float] = None,
) -> None: ...
def workspace_bytes(op: str, B: int, G: int, V: int, Vd: int, device: int) -> int: ...
def philox_word(seed: int, row: int, offset: int, position: int, index: int, tag: int) -> tuple[int, float, float]: ...
def philox4x32_10(c0: int, c1: int, c2: int, c3: int, k0: int, k1: int) -> tuple[int, int, int, int]: ...
def fast_exp(x: float) -> float: ...
def fast_log(x: float) -> float: ...
