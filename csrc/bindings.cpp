// The one Python boundary of the extension: takes DLPack arrays (capsules or objects with
// __dlpack__), checks every argument before any work, and dispatches to the CPU or CUDA op.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "specdiff/dlpack.h"
#include "specdiff/math.h"
#include "specdiff/ops.h"
#include "specdiff/philox.h"

namespace py = pybind11;
using namespace specdiff;

#ifndef SPECDIFF_VERSION
#define SPECDIFF_VERSION "0.0.0"
#endif
#ifndef SPECDIFF_CUDA_ARCHS
#define SPECDIFF_CUDA_ARCHS ""
#endif

namespace {

[[noreturn]] void value_error(const std::string& msg) { throw py::value_error(msg); }
[[noreturn]] void type_error(const std::string& msg) { throw py::type_error(msg); }

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  if (s.size() == 1) os << ",";
  os << ")";
  return os.str();
}

enum class Kind { kFloat32, kBFloat16, kFloat16, kInt32, kInt64, kBool, kUInt8, kOther };

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kFloat32: return "float32";
    case Kind::kBFloat16: return "bfloat16";
    case Kind::kFloat16: return "float16";
    case Kind::kInt32: return "int32";
    case Kind::kInt64: return "int64";
    case Kind::kBool: return "bool";
    case Kind::kUInt8: return "uint8";
    default: return "an unsupported dtype";
  }
}

// A borrowed DLPack array; the producer's deleter runs when this goes away.
class Array {
 public:
  Array() = default;
  Array(const Array&) = delete;
  Array& operator=(const Array&) = delete;
  ~Array() {
    if (legacy_ && legacy_->deleter) legacy_->deleter(legacy_);
    if (versioned_ && versioned_->deleter) versioned_->deleter(versioned_);
  }

  void take(py::handle obj, const char* name) {
    name_ = name;
    py::object cap;
    if (PyCapsule_CheckExact(obj.ptr())) {
      cap = py::reinterpret_borrow<py::object>(obj);
    } else if (py::hasattr(obj, "__dlpack__")) {
      cap = obj.attr("__dlpack__")();
    } else {
      type_error(std::string(name) + " must be a DLPack array (torch, numpy, CuPy, JAX), got " +
                 std::string(py::str(py::type::of(obj))));
    }
    PyObject* c = cap.ptr();
    if (PyCapsule_IsValid(c, "dltensor_versioned")) {
      versioned_ = static_cast<SdDLManagedTensorVersioned*>(PyCapsule_GetPointer(c, "dltensor_versioned"));
      PyCapsule_SetName(c, "used_dltensor_versioned");
      if (versioned_->version.major != 1) {
        versioned_ = nullptr;
        value_error(std::string(name) + ": unsupported DLPack major version");
      }
      t_ = &versioned_->dl_tensor;
      readonly_ = (versioned_->flags & kSdDLFlagReadOnly) != 0;
    } else if (PyCapsule_IsValid(c, "dltensor")) {
      legacy_ = static_cast<SdDLManagedTensor*>(PyCapsule_GetPointer(c, "dltensor"));
      PyCapsule_SetName(c, "used_dltensor");
      t_ = &legacy_->dl_tensor;
    } else {
      type_error(std::string(name) + " is not an unused DLPack capsule");
    }
    shape_.assign(t_->shape, t_->shape + t_->ndim);
    strides_.resize(static_cast<size_t>(t_->ndim));
    int64_t s = 1;
    for (int i = t_->ndim - 1; i >= 0; --i) {
      strides_[static_cast<size_t>(i)] = t_->strides ? t_->strides[i] : s;
      s *= t_->shape[i];
    }
    const SdDLDataType d = t_->dtype;
    if (d.lanes != 1) kind_ = Kind::kOther;
    else if (d.code == kSdDLFloat && d.bits == 32) kind_ = Kind::kFloat32;
    else if (d.code == kSdDLBfloat && d.bits == 16) kind_ = Kind::kBFloat16;
    else if (d.code == kSdDLFloat && d.bits == 16) kind_ = Kind::kFloat16;
    else if (d.code == kSdDLInt && d.bits == 32) kind_ = Kind::kInt32;
    else if (d.code == kSdDLInt && d.bits == 64) kind_ = Kind::kInt64;
    else if (d.code == kSdDLBool && d.bits == 8) kind_ = Kind::kBool;
    else if (d.code == kSdDLUInt && d.bits == 8) kind_ = Kind::kUInt8;
    else kind_ = Kind::kOther;
    if (t_->device.device_type != kSdDLCPU && t_->device.device_type != kSdDLCUDA)
      value_error(std::string(name) + " must live on the CPU or a CUDA device (DLPack device type " +
                  std::to_string(t_->device.device_type) + ")");
  }

  const std::string& name() const { return name_; }
  int ndim() const { return t_->ndim; }
  int64_t size(int i) const { return shape_[static_cast<size_t>(i)]; }
  int64_t stride(int i) const { return strides_[static_cast<size_t>(i)]; }
  Kind kind() const { return kind_; }
  bool is_cuda() const { return t_->device.device_type == kSdDLCUDA; }
  int device_id() const { return t_->device.device_id; }
  void* data() const { return static_cast<char*>(t_->data) + t_->byte_offset; }
  int64_t numel() const {
    int64_t n = 1;
    for (auto s : shape_) n *= s;
    return n;
  }

  void check_shape(const std::vector<int64_t>& want, const char* dims) const {
    if (shape_ != want)
      value_error(name_ + " must have shape " + dims + " = " + shape_str(want) + ", got " +
                  shape_str(shape_));
  }
  void check_ndim(int n, const char* dims) const {
    if (t_->ndim != n)
      value_error(name_ + " must have " + std::to_string(n) + " dimensions " + dims + ", got " +
                  std::to_string(t_->ndim) + " with shape " + shape_str(shape_));
  }
  void check_kinds(std::initializer_list<Kind> ok, const char* what) const {
    for (Kind k : ok)
      if (k == kind_) return;
    type_error(name_ + " must be " + what + ", got " + kind_name(kind_));
  }
  // Strides of an empty array are arbitrary (numpy reports 0): nothing is read, nothing to check.
  void check_last_contiguous() const {
    if (numel() == 0) return;
    if (t_->ndim > 0 && shape_.back() > 1 && strides_.back() != 1)
      value_error(name_ + " must be contiguous in its last dimension (stride 1), got stride " +
                  std::to_string(strides_.back()));
  }
  void check_contiguous() const {
    if (numel() == 0) return;
    int64_t s = 1;
    for (int i = t_->ndim - 1; i >= 0; --i) {
      if (shape_[static_cast<size_t>(i)] > 1 && strides_[static_cast<size_t>(i)] != s)
        value_error(name_ + " must be contiguous");
      s *= shape_[static_cast<size_t>(i)];
    }
  }
  void check_writable() const {
    if (readonly_) value_error(name_ + " is read-only");
  }

 private:
  std::string name_;
  SdDLTensor* t_ = nullptr;
  SdDLManagedTensor* legacy_ = nullptr;
  SdDLManagedTensorVersioned* versioned_ = nullptr;
  std::vector<int64_t> shape_, strides_;
  Kind kind_ = Kind::kOther;
  bool readonly_ = false;
};

DType logits_dtype(const Array& a) {
  a.check_kinds({Kind::kFloat32, Kind::kBFloat16, Kind::kFloat16}, "float32, bfloat16 or float16");
  return a.kind() == Kind::kFloat32 ? DType::kFloat32
         : a.kind() == Kind::kBFloat16 ? DType::kBFloat16 : DType::kFloat16;
}

LogitsView logits_view(const Array& a) {
  a.check_last_contiguous();
  LogitsView v;
  v.data = a.data();
  v.dtype = logits_dtype(a);
  v.s0 = a.stride(0);
  v.s1 = a.stride(1);
  return v;
}

IdView id_view(const Array& a) {
  a.check_kinds({Kind::kInt32, Kind::kInt64}, "int32 or int64");
  IdView v;
  v.data = a.data();
  v.is64 = a.kind() == Kind::kInt64;
  v.s0 = a.ndim() > 0 ? a.stride(0) : 0;
  v.s1 = a.ndim() > 1 ? a.stride(1) : 0;
  return v;
}

// All arrays on one device; returns true for CUDA.
struct DeviceCheck {
  bool set = false, cuda = false;
  int id = 0;
  std::string first;
  void add(const Array& a) {
    if (!set) {
      set = true;
      cuda = a.is_cuda();
      id = a.device_id();
      first = a.name();
      return;
    }
    if (a.is_cuda() != cuda || (cuda && a.device_id() != id))
      value_error(a.name() + " must be on the same device as " + first);
  }
};

// Host-side id range check (CPU arrays only; CUDA ids are checked by the caller).
void check_id_range(const Array& a, const IdView& v, int64_t rows, int64_t cols, int64_t hi,
                    const char* bound) {
  if (a.is_cuda()) return;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t x = v.at(i, j);
      if (x < 0 || x >= hi)
        value_error(a.name() + " holds " + std::to_string(x) + " at index " +
                    (cols > 1 || a.ndim() > 1 ? "(" + std::to_string(i) + ", " + std::to_string(j) + ")"
                                              : std::to_string(i)) +
                    ", outside [0, " + bound + ") = [0, " + std::to_string(hi) + ")");
    }
}

// A contiguous input of one kind and shape (dims: the shape's name in messages): its data.
template <typename T>
const T* take_contiguous(Array& a, py::handle obj, const char* name, Kind kind,
                         const std::vector<int64_t>& shape, const char* dims, DeviceCheck& dev) {
  a.take(obj, name);
  a.check_kinds({kind}, kind_name(kind));
  a.check_shape(shape, dims);
  a.check_contiguous();
  dev.add(a);
  return static_cast<const T*>(a.data());
}

// The value rules of the sampling settings, one each: the ops' bindings check scalars and CPU
// arrays with them, and check_sampling (ops.check_sampling) checks a caller's scalars with
// the same routines.  NaN fails every rule.
struct Rule {
  bool (*ok)(double);
  const char* text;  // "<name> must be <text>, got ..."
};
const Rule kTemperatureRule{[](double t) { return t >= 0.0 && !std::isinf(t); }, "finite and >= 0"};
const Rule kTopKRule{[](double k) { return k >= 0.0; }, ">= 0 (0 = off)"};
const Rule kTopPRule{[](double p) { return p > 0.0 && p <= 1.0; }, "in (0, 1] (1 = off)"};
const Rule kMinPRule{[](double m) { return m >= 0.0 && m <= 1.0; }, "in [0, 1] (0 = off)"};
const Rule kRepetitionRule{[](double r) { return std::isfinite(r) && r > 0.0; }, "finite and > 0"};
const Rule kFiniteRule{[](double v) { return std::isfinite(v); }, "finite"};

template <typename T>
[[noreturn]] void rule_error(const Rule& rule, const char* name, T v, const std::string& where) {
  std::ostringstream os;
  os.precision(9);
  os << name << " must be " << rule.text << ", got " << v << where;
  value_error(os.str());
}

template <typename T>
void check_value(const Rule& rule, const char* name, T v, const std::string& where = "") {
  if (!rule.ok(static_cast<double>(v))) rule_error(rule, name, v, where);
}

// A scalar setting the kernels read as a T: valid as given and as the T it becomes (a double
// past the float32 range is an infinity there, a tiny one 0).
template <typename T, typename S>
void check_scalar(const Rule& rule, const char* name, S value) {
  check_value(rule, name, value);
  const T t = static_cast<T>(value);
  if (!rule.ok(static_cast<double>(t))) {
    std::ostringstream os;
    os.precision(9);
    os << " (" << t << " as the kernels' " << (std::is_same_v<T, float> ? "float32" : "int64") << ")";
    rule_error(rule, name, value, os.str());
  }
}

// A checked per-row setting: a (B,) array of `kind` (CPU values checked by `rule`), or the
// scalar `value` (checked by `rule`); returns the array's data or null.
template <typename T, typename S>
const T* per_row_setting(py::handle arr, S value, const char* name, Kind kind, const Rule& rule,
                         int64_t B, DeviceCheck& dev, Array& holder) {
  if (arr.is_none()) {
    check_scalar<T>(rule, name, value);
    return nullptr;
  }
  const T* data = take_contiguous<T>(holder, arr, name, kind, {B}, "(B,)", dev);
  if (!holder.is_cuda())
    for (int64_t b = 0; b < B; ++b) check_value(rule, name, data[b], " at row " + std::to_string(b));
  return data;
}

// A per-row float32 setting (temperature, a penalty): (B,) array or scalar.
template <typename R>
R row_float(py::handle arr, double value, const char* name, const Rule& rule, int64_t B,
            DeviceCheck& dev, Array& holder) {
  R r;
  r.data = per_row_setting<float>(arr, value, name, Kind::kFloat32, rule, B, dev, holder);
  r.value = static_cast<float>(value);
  return r;
}

RowTemperature row_temperature(py::handle arr, double value, const char* name, int64_t B,
                               DeviceCheck& dev, Array& holder) {
  return row_float<RowTemperature>(arr, value, name, kTemperatureRule, B, dev, holder);
}

RowSeed row_seed_arg(py::handle arr, int64_t value, int64_t B, DeviceCheck& dev, Array& holder) {
  RowSeed s;
  s.value = static_cast<uint64_t>(value);
  if (!arr.is_none()) {
    s.data = take_contiguous<int64_t>(holder, arr, "seed", Kind::kInt64, {B}, "(B,)", dev);
  }
  return s;
}

// Top-k / top-p / min-p: (B,) arrays or scalars; CPU values are checked here.
RowFilter row_filter(py::handle top_k, int64_t top_k_value, py::handle top_p, double top_p_value,
                     py::handle min_p, double min_p_value, int64_t B, DeviceCheck& dev,
                     Array& hk, Array& hp, Array& hm) {
  RowFilter f;
  f.top_k = per_row_setting<int64_t>(top_k, top_k_value, "top_k", Kind::kInt64, kTopKRule, B, dev, hk);
  f.top_k_value = top_k_value;
  f.top_p = per_row_setting<float>(top_p, top_p_value, "top_p", Kind::kFloat32, kTopPRule, B, dev, hp);
  f.top_p_value = static_cast<float>(top_p_value);
  f.min_p = per_row_setting<float>(min_p, min_p_value, "min_p", Kind::kFloat32, kMinPRule, B, dev, hm);
  f.min_p_value = static_cast<float>(min_p_value);
  return f;
}

// ops.check_sampling: the scalar settings a caller holds before any array exists, checked by
// the rules above (None: not given).
void check_sampling_py(std::optional<double> temperature, std::optional<int64_t> top_k,
                       std::optional<double> top_p, std::optional<double> min_p,
                       std::optional<double> repetition, std::optional<double> presence,
                       std::optional<double> frequency) {
  if (temperature) check_scalar<float>(kTemperatureRule, "temperature", *temperature);
  if (top_k) check_scalar<int64_t>(kTopKRule, "top_k", *top_k);
  if (top_p) check_scalar<float>(kTopPRule, "top_p", *top_p);
  if (min_p) check_scalar<float>(kMinPRule, "min_p", *min_p);
  if (repetition) check_scalar<float>(kRepetitionRule, "repetition_penalty", *repetition);
  if (presence) check_scalar<float>(kFiniteRule, "presence_penalty", *presence);
  if (frequency) check_scalar<float>(kFiniteRule, "frequency_penalty", *frequency);
}

uint64_t offset_arg(int64_t offset) {
  if (offset < 0 || offset >= (int64_t{1} << 56))
    value_error("offset must be in [0, 2^56), got " + std::to_string(offset));
  return static_cast<uint64_t>(offset);
}

void check_output(Array& a, py::handle obj, const char* name, Kind kind,
                  const std::vector<int64_t>& shape, const char* dims, DeviceCheck& dev) {
  take_contiguous<void>(a, obj, name, kind, shape, dims, dev);
  a.check_writable();
}

// A strided (B, G) input of one kind: its data, and its element strides in *s0, *s1.
template <typename T>
const T* take_bg(Array& a, py::handle obj, const char* name, Kind kind, int64_t B, int64_t G,
                 DeviceCheck& dev, int64_t* s0, int64_t* s1) {
  a.take(obj, name);
  a.check_kinds({kind}, kind_name(kind));
  a.check_shape({B, G}, "(B, G)");
  dev.add(a);
  *s0 = a.stride(0);
  *s1 = a.stride(1);
  return static_cast<const T*>(a.data());
}

// A (B, N, V) logits input (V >= 1, last dimension contiguous); fills B, N, V.
LogitsView take_logits(Array& a, py::handle obj, const char* name, DeviceCheck& dev, int64_t* B,
                       int64_t* N, int64_t* V) {
  a.take(obj, name);
  a.check_ndim(3, "(B, N, V)");
  dev.add(a);
  *B = a.size(0);
  *N = a.size(1);
  *V = a.size(2);
  if (*V < 1) value_error(std::string(name) + " must have a vocabulary of at least 1, got V = 0");
  return logits_view(a);
}

#if defined(SPECDIFF_WITH_CUDA)
void check_cuda(int err, const char* what) {
  const std::string where = cuda::take_error_where();
  if (err != 0)
    throw std::runtime_error(std::string(what) + ": " + cuda::error_string(err) +
                             (where.empty() ? "" : " (at " + where + ")"));
}
void* cuda_stream(uint64_t stream) { return reinterpret_cast<void*>(stream); }
void* workspace_ptr(py::handle ws, size_t need, Array& holder, DeviceCheck& dev) {
  if (need == 0) return nullptr;
  if (ws.is_none()) value_error("workspace of " + std::to_string(need) + " bytes is required");
  holder.take(ws, "workspace");
  holder.check_kinds({Kind::kUInt8}, "uint8");
  holder.check_contiguous();
  dev.add(holder);
  if (static_cast<size_t>(holder.numel()) < need)
    value_error("workspace must hold at least " + std::to_string(need) + " bytes, got " +
                std::to_string(holder.numel()));
  return holder.data();
}
#endif

[[noreturn, maybe_unused]] void no_cuda() {
  value_error("the arrays are on a CUDA device but specdiff_ext was built without CUDA kernels "
              "(build_info()['cuda'] is False); install with nvcc on the PATH");
}

// The CUDA half of an op call: code naming cuda:: symbols, compiled only with the kernels.
#if defined(SPECDIFF_WITH_CUDA)
#define SD_ON_CUDA(...) __VA_ARGS__
#else
#define SD_ON_CUDA(...) nullptr
#endif

// Runs an op where its arrays live: cpu() without the GIL, or on CUDA cuda() -- a launcher's
// error code -- checked and reported under the op's name (no CUDA build: a ValueError).
template <typename Cpu, typename Cuda>
void run_on_device(const char* op, const DeviceCheck& dev, Cpu&& cpu, Cuda&& cuda) {
  if (!dev.cuda) {
    py::gil_scoped_release nogil;
    cpu();
    return;
  }
#if defined(SPECDIFF_WITH_CUDA)
  check_cuda(cuda(), op);
#else
  (void)op;
  (void)cuda;
  no_cuda();
#endif
}

// ---------------------------------------------------------------- verify / rejection_sample
void verify_py(py::handle target_logits, py::handle draft_ids, py::handle draft_logits,
               py::handle draft_point_mass, py::handle vocab_map, py::handle vocab_inv,
               py::handle temperature, double temperature_value, py::handle draft_temperature,
               double draft_temperature_value, py::handle seed, int64_t seed_value,
               int64_t offset, py::handle target_lse, py::handle draft_lse, py::handle top_k,
               int64_t top_k_value, py::handle top_p, double top_p_value, py::handle min_p,
               double min_p_value, py::handle out_ids, py::handle out_num_accepted,
               py::handle out_valid, [[maybe_unused]] py::handle workspace,
               [[maybe_unused]] uint64_t stream) {
  DeviceCheck dev;
  Array tl, di, dl, pm, vm, vi, ta, dta, sd, tlse, dlse, oi, on, ov, ws, hk, hp, hm;
  VerifyParams p;
  tl.take(target_logits, "target_logits");
  tl.check_ndim(3, "(B, G+1, V)");
  dev.add(tl);
  p.B = tl.size(0);
  p.G = tl.size(1) - 1;
  p.V = tl.size(2);
  if (p.G < 0) value_error("target_logits must have G+1 >= 1 positions, got shape (" + std::to_string(p.B) + ", 0, " + std::to_string(p.V) + ")");
  if (p.V < 1) value_error("target_logits must have a vocabulary of at least 1, got V = 0");
  p.target = logits_view(tl);  // target_logits: (B, G+1, V)
  di.take(draft_ids, "draft_ids");
  p.draft_ids = id_view(di);
  di.check_shape({p.B, p.G}, "(B, G)");  // draft_ids: (B, G)
  dev.add(di);
  p.Vd = p.V;
  if (!vocab_map.is_none()) {
    vm.take(vocab_map, "vocab_map");
    p.vocab_map = id_view(vm);
    vm.check_ndim(1, "(Vd,)");  // vocab_map: (Vd,)
    dev.add(vm);
    p.Vd = vm.size(0);
    if (p.Vd < 1 || p.Vd > p.V)
      value_error("vocab_map must have 1 <= Vd <= V = " + std::to_string(p.V) + " entries, got " + std::to_string(p.Vd));
    check_id_range(vm, p.vocab_map, p.Vd, 1, p.V, "V");
    if (vocab_inv.is_none()) value_error("vocab_inv is required with vocab_map");
    p.vocab_inv = take_contiguous<int32_t>(vi, vocab_inv, "vocab_inv", Kind::kInt32, {p.V}, "(V,)", dev);
  }
  if (!draft_logits.is_none()) {
    dl.take(draft_logits, "draft_logits");
    dl.check_ndim(3, "(B, G, Vd)");
    dl.check_shape({p.B, p.G, p.Vd}, "(B, G, Vd)");  // draft_logits: (B, G, Vd)
    dev.add(dl);
    p.draft = logits_view(dl);
  }
  if (!draft_point_mass.is_none()) {
    p.point_mass = take_bg<uint8_t>(pm, draft_point_mass, "draft_point_mass", Kind::kBool, p.B, p.G,
                                    dev, &p.pm_s0, &p.pm_s1);  // draft_point_mass: (B, G)
  }
  p.tau = row_temperature(temperature, temperature_value, "temperature", p.B, dev, ta);
  p.draft_tau = row_temperature(draft_temperature, draft_temperature_value, "draft_temperature", p.B, dev, dta);
  p.seed = row_seed_arg(seed, seed_value, p.B, dev, sd);
  p.offset = offset_arg(offset);
  p.filter = row_filter(top_k, top_k_value, top_p, top_p_value, min_p, min_p_value, p.B, dev, hk, hp, hm);
  if (!target_lse.is_none()) {
    p.target_lse = take_contiguous<float>(tlse, target_lse, "target_lse", Kind::kFloat32,
                                          {p.B, p.G + 1}, "(B, G+1)", dev);
  }
  if (!draft_lse.is_none()) {
    p.draft_lse = take_contiguous<float>(dlse, draft_lse, "draft_lse", Kind::kFloat32, {p.B, p.G},
                                         "(B, G)", dev);
  }
  check_output(oi, out_ids, "out_ids", Kind::kInt64, {p.B, p.G + 1}, "(B, G+1)", dev);
  check_output(on, out_num_accepted, "out_num_accepted", Kind::kInt64, {p.B}, "(B,)", dev);
  check_output(ov, out_valid, "out_valid", Kind::kBool, {p.B}, "(B,)", dev);
  p.out_ids = static_cast<int64_t*>(oi.data());
  p.out_num_accepted = static_cast<int64_t*>(on.data());
  p.out_valid = static_cast<bool*>(ov.data());
  check_id_range(di, p.draft_ids, p.B, p.G, p.V, "V");
  if (p.B == 0) return;

  run_on_device("verify", dev, [&] { cpu::verify(p); }, SD_ON_CUDA([&] {
    if (p.filter.any())
      value_error("verify on CUDA takes filtered logits (ops.filter_logits); top_k, top_p and "
                  "min_p must be off here");
    const size_t need = cuda::verify_workspace_bytes(p.B, p.G, p.V, p.Vd, dev.id);
    return cuda::verify(p, workspace_ptr(workspace, need, ws, dev), need, cuda_stream(stream), dev.id);
  }));
}

// ---------------------------------------------------------------- verify_tree
// Host check of a CPU tree: parents[b, 0] == -1; for i >= 1, -1 <= parents[b, i] < i; a used
// node's token (parents >= 0) in [0, V).  CUDA trees are checked by ops.py's device checks (the
// kernel only compares these values, so bad ones cannot make it read out of bounds).
void check_tree(const Array& pa, const IdView& parents, const Array& tk, const IdView& tokens,
                int64_t B, int64_t N, int64_t V) {
  if (pa.is_cuda()) return;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < N; ++i) {
      const int64_t q = parents.at(b, i);
      const std::string at = " at (" + std::to_string(b) + ", " + std::to_string(i) + ")";
      if (i == 0 && q != -1)
        value_error("parents must be -1 at the root (node 0), got " + std::to_string(q) + at);
      if (i > 0 && (q < -1 || q >= i))
        value_error("parents must hold a node before each node (0 <= parents[b, i] < i) or -1 "
                    "for an unused node, got " + std::to_string(q) + at);
      if (i > 0 && q >= 0) {
        const int64_t t = tokens.at(b, i);
        if (t < 0 || t >= V)
          value_error(tk.name() + " holds " + std::to_string(t) + at + ", outside [0, V) = [0, " +
                      std::to_string(V) + ")");
      }
    }
}

void verify_tree_py(py::handle target_logits, py::handle tokens, py::handle parents,
                    py::handle temperature, double temperature_value, py::handle seed,
                    int64_t seed_value, int64_t offset, py::handle top_k, int64_t top_k_value,
                    py::handle top_p, double top_p_value, py::handle min_p, double min_p_value,
                    py::handle out_ids, py::handle out_num_accepted, py::handle out_path,
                    py::handle out_valid, [[maybe_unused]] uint64_t stream) {
  DeviceCheck dev;
  Array tl, tk, pa, ta, sd, oi, on, op, ov, hk, hp, hm;
  TreeVerifyParams p;
  tl.take(target_logits, "target_logits");
  tl.check_ndim(3, "(B, N, V)");
  dev.add(tl);
  p.B = tl.size(0);
  p.N = tl.size(1);
  p.V = tl.size(2);
  if (p.N < 1) value_error("target_logits must have N >= 1 nodes (the root), got shape (" + std::to_string(p.B) + ", 0, " + std::to_string(p.V) + ")");
  if (p.V < 1) value_error("target_logits must have a vocabulary of at least 1, got V = 0");
  p.target = logits_view(tl);  // target_logits: (B, N, V)
  tk.take(tokens, "tokens");
  p.tokens = id_view(tk);
  tk.check_shape({p.B, p.N}, "(B, N)");  // tokens: (B, N)
  dev.add(tk);
  pa.take(parents, "parents");
  p.parents = id_view(pa);
  pa.check_shape({p.B, p.N}, "(B, N)");  // parents: (B, N)
  dev.add(pa);
  p.tau = row_temperature(temperature, temperature_value, "temperature", p.B, dev, ta);
  p.seed = row_seed_arg(seed, seed_value, p.B, dev, sd);
  p.offset = offset_arg(offset);
  p.filter = row_filter(top_k, top_k_value, top_p, top_p_value, min_p, min_p_value, p.B, dev, hk, hp, hm);
  check_output(oi, out_ids, "out_ids", Kind::kInt64, {p.B, p.N}, "(B, N)", dev);
  check_output(on, out_num_accepted, "out_num_accepted", Kind::kInt64, {p.B}, "(B,)", dev);
  check_output(op, out_path, "out_path", Kind::kInt64, {p.B, p.N}, "(B, N)", dev);
  check_output(ov, out_valid, "out_valid", Kind::kBool, {p.B}, "(B,)", dev);
  p.out_ids = static_cast<int64_t*>(oi.data());
  p.out_num_accepted = static_cast<int64_t*>(on.data());
  p.out_path = static_cast<int64_t*>(op.data());
  p.out_valid = static_cast<bool*>(ov.data());
  check_tree(pa, p.parents, tk, p.tokens, p.B, p.N, p.V);
  if (p.B == 0) return;

  run_on_device("verify_tree", dev, [&] { cpu::verify_tree(p); }, SD_ON_CUDA([&] {
    if (p.filter.any())
      value_error("verify_tree on CUDA takes filtered logits (ops.filter_logits); top_k, top_p "
                  "and min_p must be off here");
    return cuda::verify_tree(p, cuda_stream(stream), dev.id);
  }));
}

// ---------------------------------------------------------------- gather_logprobs
void gather_py(py::handle logits, py::handle ids, py::handle temperature, double temperature_value,
               py::handle out_lse, py::handle out_logprobs, [[maybe_unused]] py::handle workspace,
               [[maybe_unused]] uint64_t stream) {
  DeviceCheck dev;
  Array lg, id, ta, ol, op, ws;
  GatherParams p;
  p.logits = take_logits(lg, logits, "logits", dev, &p.B, &p.N, &p.V);  // logits: (B, N, V)
  id.take(ids, "ids");
  p.ids = id_view(id);
  id.check_shape({p.B, p.N}, "(B, N)");  // ids: (B, N)
  dev.add(id);
  p.tau = row_temperature(temperature, temperature_value, "temperature", p.B, dev, ta);
  check_output(ol, out_lse, "out_lse", Kind::kFloat32, {p.B, p.N}, "(B, N)", dev);
  check_output(op, out_logprobs, "out_logprobs", Kind::kFloat32, {p.B, p.N}, "(B, N)", dev);
  p.out_lse = static_cast<float*>(ol.data());
  p.out_logprobs = static_cast<float*>(op.data());
  check_id_range(id, p.ids, p.B, p.N, p.V, "V");
  if (p.B * p.N == 0) return;
  run_on_device("gather_logprobs", dev, [&] { cpu::gather_logprobs(p); }, SD_ON_CUDA([&] {
    const size_t need = cuda::gather_workspace_bytes(p.B, p.N, p.V, dev.id);
    return cuda::gather_logprobs(p, workspace_ptr(workspace, need, ws, dev), need, cuda_stream(stream), dev.id);
  }));
}

// ---------------------------------------------------------------- denoise_step
void denoise_py(py::handle logits, py::handle tokens, py::handle commit_step, int64_t step,
                int64_t num_steps, int mode, py::handle vocab_map, py::handle temperature,
                double temperature_value, py::handle seed, int64_t seed_value, int64_t offset,
                py::handle out_tokens, py::handle out_commit_step, py::handle out_lse,
                py::handle out_valid, [[maybe_unused]] py::handle workspace,
               [[maybe_unused]] uint64_t stream) {
  DeviceCheck dev;
  Array lg, tk, cs, vm, ta, sd, ot, oc, ol, ov, ws;
  DenoiseParams p;
  lg.take(logits, "logits");
  lg.check_ndim(3, "(B, G, Vd)");  // logits: (B, G, Vd)
  dev.add(lg);
  p.B = lg.size(0);
  p.G = lg.size(1);
  p.Vd = lg.size(2);
  if (p.Vd < 1) value_error("logits must have a vocabulary of at least 1, got Vd = 0");
  p.logits = logits_view(lg);
  tk.take(tokens, "tokens");
  p.tokens = id_view(tk);
  tk.check_shape({p.B, p.G}, "(B, G)");  // tokens: (B, G)
  dev.add(tk);
  p.commit_step = take_bg<int32_t>(cs, commit_step, "commit_step", Kind::kInt32, p.B, p.G, dev,
                                   &p.cs_s0, &p.cs_s1);  // commit_step: (B, G)
  if (num_steps < 1) value_error("num_steps must be >= 1, got " + std::to_string(num_steps));
  if (step < 0 || step >= num_steps)
    value_error("step must be in [0, num_steps) = [0, " + std::to_string(num_steps) + "), got " + std::to_string(step));
  if (num_steps > (int64_t{1} << 30)) value_error("num_steps must be < 2^30, got " + std::to_string(num_steps));
  p.step = step;
  p.num_steps = num_steps;
  if (mode < 0 || mode > 2) value_error("mode must be 0 (random), 1 (confidence) or 2 (left_to_right), got " + std::to_string(mode));
  p.mode = static_cast<CommitMode>(mode);
  if (!vocab_map.is_none()) {
    vm.take(vocab_map, "vocab_map");
    p.vocab_map = id_view(vm);
    vm.check_shape({p.Vd}, "(Vd,)");  // vocab_map: (Vd,)
    dev.add(vm);
    check_id_range(vm, p.vocab_map, p.Vd, 1, INT64_MAX, "2^63");
  }
  p.tau = row_temperature(temperature, temperature_value, "temperature", p.B, dev, ta);
  p.seed = row_seed_arg(seed, seed_value, p.B, dev, sd);
  p.offset = offset_arg(offset);
  check_output(ot, out_tokens, "out_tokens", Kind::kInt64, {p.B, p.G}, "(B, G)", dev);
  check_output(oc, out_commit_step, "out_commit_step", Kind::kInt32, {p.B, p.G}, "(B, G)", dev);
  check_output(ol, out_lse, "out_lse", Kind::kFloat32, {p.B, p.G}, "(B, G)", dev);
  check_output(ov, out_valid, "out_valid", Kind::kBool, {p.B}, "(B,)", dev);
  p.out_tokens = static_cast<int64_t*>(ot.data());
  p.out_commit_step = static_cast<int32_t*>(oc.data());
  p.out_lse = static_cast<float*>(ol.data());
  p.out_valid = static_cast<bool*>(ov.data());
  if (p.B == 0) return;
  run_on_device("denoise_step", dev, [&] { cpu::denoise_step(p); }, SD_ON_CUDA([&] {
    const size_t need = cuda::denoise_workspace_bytes(p.B, p.G, p.Vd, dev.id);
    return cuda::denoise_step(p, workspace_ptr(workspace, need, ws, dev), need, cuda_stream(stream), dev.id);
  }));
}

// ---------------------------------------------------------------- filter_logits
void filter_py(py::handle logits, py::handle temperature, double temperature_value,
               py::handle top_k, int64_t top_k_value, py::handle top_p, double top_p_value,
               py::handle min_p, double min_p_value, py::handle out, [[maybe_unused]] uint64_t stream) {
  DeviceCheck dev;
  Array lg, ta, hk, hp, hm, o;
  FilterParams p;
  p.logits = take_logits(lg, logits, "logits", dev, &p.B, &p.N, &p.V);  // logits: (B, N, V)
  p.tau = row_temperature(temperature, temperature_value, "temperature", p.B, dev, ta);
  p.filter = row_filter(top_k, top_k_value, top_p, top_p_value, min_p, min_p_value, p.B, dev, hk, hp, hm);
  check_output(o, out, "out", lg.kind(), {p.B, p.N, p.V}, "(B, N, V)", dev);
  p.out = o.data();
  if (p.B * p.N == 0) return;
  run_on_device("filter_logits", dev, [&] { cpu::filter_logits(p); },
                SD_ON_CUDA([&] { return cuda::filter_logits(p, cuda_stream(stream), dev.id); }));
}

// ---------------------------------------------------------------- apply_penalties
void penalties_py(py::handle logits, py::handle ids, py::handle lengths, py::handle repetition,
                  double repetition_value, py::handle presence, double presence_value,
                  py::handle frequency, double frequency_value, py::handle out,
                  [[maybe_unused]] py::handle workspace, [[maybe_unused]] uint64_t stream) {
  DeviceCheck dev;
  Array lg, id, ln, hr, hpr, hf, o, ws;
  PenaltyParams p;
  p.logits = take_logits(lg, logits, "logits", dev, &p.B, &p.N, &p.V);  // logits: (B, N, V)
  id.take(ids, "ids");
  id.check_ndim(2, "(B, L)");  // ids: (B, L)
  p.ids = id_view(id);
  if (id.size(0) != p.B) value_error("ids must have B = " + std::to_string(p.B) + " rows, got " + std::to_string(id.size(0)));
  p.L = id.size(1);
  dev.add(id);
  p.lengths = take_contiguous<int64_t>(ln, lengths, "lengths", Kind::kInt64, {p.B}, "(B,)", dev);
  p.repetition = row_float<RowFloat>(repetition, repetition_value, "repetition_penalty", kRepetitionRule, p.B, dev, hr);
  p.presence = row_float<RowFloat>(presence, presence_value, "presence_penalty", kFiniteRule, p.B, dev, hpr);
  p.frequency = row_float<RowFloat>(frequency, frequency_value, "frequency_penalty", kFiniteRule, p.B, dev, hf);
  check_output(o, out, "out", Kind::kFloat32, {p.B, p.N, p.V}, "(B, N, V)", dev);
  p.out = o.data();
  if (!ln.is_cuda()) {
    for (int64_t b = 0; b < p.B; ++b) {
      const int64_t len = p.lengths[b];
      // Compared with L - (N - 1) (both sides in range): len + N - 1 could wrap.
      const int64_t hi = p.L - std::max<int64_t>(p.N - 1, 0);
      if (len < 0 || len > hi)
        value_error("lengths[" + std::to_string(b) + "] = " + std::to_string(len) +
                    ": position n sees ids[b, :lengths[b] + n], so 0 <= lengths[b] <= L - (N - 1) = " +
                    std::to_string(hi) + " is required");
      if (!id.is_cuda())
        for (int64_t j = 0; j < len + std::max<int64_t>(p.N - 1, 0); ++j) {
          const int64_t t = p.ids.at(b, j);
          if (t < 0 || t >= p.V)
            value_error("ids holds " + std::to_string(t) + " at index (" + std::to_string(b) + ", " +
                        std::to_string(j) + "), outside [0, V) = [0, " + std::to_string(p.V) + ")");
        }
    }
  }
  if (p.B * p.N == 0) return;
  run_on_device("apply_penalties", dev, [&] { cpu::apply_penalties(p); }, SD_ON_CUDA([&] {
    const size_t need = cuda::penalty_workspace_bytes(p.B, p.V);
    return cuda::apply_penalties(p, workspace_ptr(workspace, need, ws, dev), need, cuda_stream(stream), dev.id);
  }));
}

// ---------------------------------------------------------------- linear_f32 (CPU only)
// A 2-D (or 3-D packed) float32 array as the checks below see it: data, shape, element strides.
struct Mat {
  const char* name;
  const void* data;
  std::vector<int64_t> shape, strides;
};

// The checks of linear_f32 (any front end), then the kernel without the GIL.
void run_linear(const Mat& x, const Mat& w, const Mat& out, int threads, bool use_simd) {
  if (x.shape.size() != 2)
    value_error("x must have 2 dimensions (M, K), got shape " + shape_str(x.shape));
  if (w.shape.size() != 3)
    value_error("w_packed must have 3 dimensions (P, K, 16), got shape " + shape_str(w.shape));
  if (out.shape.size() != 2)
    value_error("out must have 2 dimensions (M, N), got shape " + shape_str(out.shape));
  const int64_t M = x.shape[0], K = x.shape[1], P = w.shape[0], N = out.shape[1];
  if (w.shape[1] != K || w.shape[2] != 16)
    value_error("w_packed must have shape (P, K, 16) with K = " + std::to_string(K) +
                " (x's columns), got " + shape_str(w.shape));
  if (out.shape[0] != M)
    value_error("out must have M = " + std::to_string(M) + " rows (x's), got " +
                std::to_string(out.shape[0]));
  if (P != (N + 15) / 16)
    value_error("out's N = " + std::to_string(N) + " columns need ceil(N / 16) = " +
                std::to_string((N + 15) / 16) + " panels, but w_packed has " + std::to_string(P));
  if (threads < 1) value_error("threads must be at least 1, got " + std::to_string(threads));
  {  // contiguous (the stride of a dimension of size 1 does not matter)
    const int64_t want[3] = {16 * K, 16, 1};
    for (int i = 0; i < 3; ++i)
      if (P * K > 0 && w.shape[i] > 1 && w.strides[i] != want[i])
        value_error("w_packed must be contiguous");
  }
  if (M == 0 || N == 0) return;
  if (K > 1 && x.strides[1] != 1)
    value_error("x must be contiguous in its last dimension (stride 1), got stride " +
                std::to_string(x.strides[1]));
  if (N > 1 && out.strides[1] != 1)
    value_error("out must be contiguous in its last dimension (stride 1), got stride " +
                std::to_string(out.strides[1]));
  if (M > 1 && x.strides[0] < K)
    value_error("x's row stride must be at least K = " + std::to_string(K) + ", got " +
                std::to_string(x.strides[0]));
  if (M > 1 && out.strides[0] < N)
    value_error("out's row stride must be at least N = " + std::to_string(N) + ", got " +
                std::to_string(out.strides[0]));
  // out is written while x and w_packed are read: no shared memory
  auto lo = [](const Mat& a) { return static_cast<const char*>(a.data); };
  auto hi = [](const Mat& a, int64_t rows, int64_t cols) {
    return static_cast<const char*>(a.data) + ((rows - 1) * a.strides[0] + cols) * 4;
  };
  const char *o0 = lo(out), *o1 = hi(out, M, N), *x0 = lo(x), *x1 = hi(x, M, K);
  const char *w0 = lo(w), *w1 = w0 + P * K * 16 * 4;
  if ((o0 < x1 && x0 < o1) || (o0 < w1 && w0 < o1))
    value_error("out must not overlap x or w_packed");
  LinearParams p;
  p.x = static_cast<const float*>(x.data);
  p.x_s0 = M > 1 ? x.strides[0] : K;
  p.w = static_cast<const float*>(w.data);
  p.out = static_cast<float*>(const_cast<void*>(out.data));
  p.out_s0 = M > 1 ? out.strides[0] : N;
  p.M = M;
  p.N = N;
  p.K = K;
  p.threads = threads;
  p.use_simd = use_simd;
  py::gil_scoped_release nogil;
  cpu::linear_f32(p);
}

// DLPack front end (torch, numpy, CuPy, JAX arrays).
void linear_py(py::handle x, py::handle w_packed, py::handle out, int threads, bool use_simd) {
  Array xa, wa, oa;
  xa.take(x, "x");
  wa.take(w_packed, "w_packed");
  oa.take(out, "out");
  for (const Array* a : {&xa, &wa, &oa}) {
    if (a->is_cuda())
      value_error("linear_f32 runs on the CPU: " + a->name() + " is on a CUDA device");
    a->check_kinds({Kind::kFloat32}, "float32");
  }
  oa.check_writable();
  auto mat = [](const Array& a, const char* name) {
    Mat m{name, a.data(), {}, {}};
    for (int i = 0; i < a.ndim(); ++i) {
      m.shape.push_back(a.size(i));
      m.strides.push_back(a.stride(i));
    }
    return m;
  };
  run_linear(mat(xa, "x"), mat(wa, "w_packed"), mat(oa, "out"), threads, use_simd);
}

// numpy front end: the same checks for a fraction of DLPack's per-call cost (PackedLinear's
// path: torch.Tensor.numpy() shares memory).
void linear_np(py::array x, py::array w_packed, py::array out, int threads) {
  auto mat = [](const py::array& a, const char* name, bool write) {
    if (!a.dtype().is(py::dtype::of<float>()))
      type_error(std::string(name) + " must be float32, got " + std::string(py::str(a.dtype())));
    if (write && !a.writeable()) value_error(std::string(name) + " is read-only");
    Mat m{name, a.data(), {}, {}};
    for (py::ssize_t i = 0; i < a.ndim(); ++i) {
      if (a.strides(i) % 4 != 0)
        value_error(std::string(name) + " has a stride that is not a whole number of floats");
      m.shape.push_back(a.shape(i));
      m.strides.push_back(a.strides(i) / 4);
    }
    return m;
  };
  run_linear(mat(x, "x", false), mat(w_packed, "w_packed", false), mat(out, "out", true),
             threads, true);
}

py::dict build_info() {
  py::dict d;
  d["version"] = SPECDIFF_VERSION;
#if defined(SPECDIFF_WITH_CUDA)
  d["cuda"] = true;
  std::vector<int> archs;
  std::string s = SPECDIFF_CUDA_ARCHS;
  size_t pos = 0;
  while (pos < s.size()) {
    size_t end = s.find_first_of(";, ", pos);
    if (end == std::string::npos) end = s.size();
    std::string tok = s.substr(pos, end - pos);
    std::string digits;
    for (char c : tok) {
      if (c >= '0' && c <= '9') digits += c;
      else break;
    }
    if (!digits.empty()) archs.push_back(std::stoi(digits));
    pos = end + 1;
  }
  d["cuda_archs"] = archs;
  d["cuda_device_count"] = cuda::device_count();
  d["cuda_available"] = cuda::device_count() > 0;
#else
  d["cuda"] = false;
  d["cuda_archs"] = std::vector<int>{};
  d["cuda_device_count"] = 0;
  d["cuda_available"] = false;
#endif
  d["openmp"] = cpu::has_openmp();
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "specdiff_ext compiled core: denoise, gather and rejection-sampling ops on DLPack arrays";
  m.def("build_info", &build_info, "What was compiled in: version, cuda, cuda_archs, cuda_available, openmp.");
  m.def("verify", &verify_py, "Chain rejection sampling over draft blocks (docs/ops.md); fills the out_* arrays.",
        py::arg("target_logits"), py::arg("draft_ids"), py::arg("draft_logits"),
        py::arg("draft_point_mass"), py::arg("vocab_map"), py::arg("vocab_inv"),
        py::arg("temperature"), py::arg("temperature_value"), py::arg("draft_temperature"),
        py::arg("draft_temperature_value"), py::arg("seed"), py::arg("seed_value"),
        py::arg("offset"), py::arg("target_lse"), py::arg("draft_lse"), py::arg("top_k"),
        py::arg("top_k_value"), py::arg("top_p"), py::arg("top_p_value"), py::arg("min_p"),
        py::arg("min_p_value"), py::arg("out_ids"),
        py::arg("out_num_accepted"), py::arg("out_valid"), py::arg("workspace"),
        py::arg("stream"));
  m.def("verify_tree", &verify_tree_py,
        "Sample-and-match verification of a draft tree (docs/design.md); fills the out_* arrays.",
        py::arg("target_logits"), py::arg("tokens"), py::arg("parents"), py::arg("temperature"),
        py::arg("temperature_value"), py::arg("seed"), py::arg("seed_value"), py::arg("offset"),
        py::arg("top_k"), py::arg("top_k_value"), py::arg("top_p"), py::arg("top_p_value"),
        py::arg("min_p"), py::arg("min_p_value"), py::arg("out_ids"),
        py::arg("out_num_accepted"), py::arg("out_path"), py::arg("out_valid"), py::arg("stream"));
  m.def("linear_f32", &linear_py,
        "out = x @ W.T in float32 on the CPU, W packed as (ceil(N/16), K, 16) panels (specdiff_ext.cpu_linear).",
        py::arg("x"), py::arg("w_packed"), py::arg("out"), py::arg("threads") = 1,
        py::arg("use_simd") = true);
  m.def("_linear_f32_np", &linear_np,
        "linear_f32 for numpy arrays (float32, the same checks), the cheap path of PackedLinear.",
        py::arg("x"), py::arg("w_packed"), py::arg("out"), py::arg("threads") = 1);
  m.def("linear_simd", &cpu::linear_simd_available,
        "Whether linear_f32 runs its AVX2/FMA path on this CPU (else the portable one, same bits).");
  m.def("gather_logprobs", &gather_py, "Log-sum-exp of each row and log-probability of one id per row.",
        py::arg("logits"), py::arg("ids"), py::arg("temperature"), py::arg("temperature_value"),
        py::arg("out_lse"), py::arg("out_logprobs"), py::arg("workspace"), py::arg("stream"));
  m.def("denoise_step", &denoise_py, "One masked-diffusion reverse step: sample and commit tokens.",
        py::arg("logits"), py::arg("tokens"), py::arg("commit_step"), py::arg("step"),
        py::arg("num_steps"), py::arg("mode"), py::arg("vocab_map"), py::arg("temperature"),
        py::arg("temperature_value"), py::arg("seed"), py::arg("seed_value"), py::arg("offset"),
        py::arg("out_tokens"), py::arg("out_commit_step"), py::arg("out_lse"),
        py::arg("out_valid"), py::arg("workspace"), py::arg("stream"));
  m.def("filter_logits", &filter_py,
        "Top-k, top-p and min-p at a temperature: copies logits into out with dropped entries at -inf.",
        py::arg("logits"), py::arg("temperature"), py::arg("temperature_value"), py::arg("top_k"),
        py::arg("top_k_value"), py::arg("top_p"), py::arg("top_p_value"), py::arg("min_p"),
        py::arg("min_p_value"), py::arg("out"), py::arg("stream"));
  m.def("apply_penalties", &penalties_py,
        "Repetition, presence and frequency penalties per position given the tokens before it (float32 out).",
        py::arg("logits"), py::arg("ids"), py::arg("lengths"), py::arg("repetition"),
        py::arg("repetition_value"), py::arg("presence"), py::arg("presence_value"),
        py::arg("frequency"), py::arg("frequency_value"), py::arg("out"), py::arg("workspace"),
        py::arg("stream"));
  m.def("check_sampling", &check_sampling_py,
        "Checks scalar sampling settings by the ops' own rules (None: not given); ValueError naming the first bad one.",
        py::arg("temperature") = py::none(), py::arg("top_k") = py::none(), py::arg("top_p") = py::none(),
        py::arg("min_p") = py::none(), py::arg("repetition_penalty") = py::none(),
        py::arg("presence_penalty") = py::none(), py::arg("frequency_penalty") = py::none());
  m.def("workspace_bytes",
        [](const std::string& op, int64_t B, int64_t G, int64_t V, int64_t Vd, int device) -> size_t {
#if defined(SPECDIFF_WITH_CUDA)
          if (op == "verify") return cuda::verify_workspace_bytes(B, G, V, Vd, device);
          if (op == "gather_logprobs") return cuda::gather_workspace_bytes(B, G, V, device);
          if (op == "denoise_step") return cuda::denoise_workspace_bytes(B, G, Vd, device);
          if (op == "apply_penalties") return cuda::penalty_workspace_bytes(B, V);
          value_error("workspace_bytes: unknown op '" + op + "'");
#else
          (void)op; (void)B; (void)G; (void)V; (void)Vd; (void)device;
          return 0;
#endif
        },
        "CUDA workspace bytes an op needs for these sizes.", py::arg("op"), py::arg("B"),
        py::arg("G"), py::arg("V"), py::arg("Vd"), py::arg("device"));
  m.def("philox_word",
        [](int64_t seed, int64_t row, int64_t offset, uint32_t position, uint64_t index, uint32_t tag) {
          RowSeed s;
          s.value = static_cast<uint64_t>(seed);
          const RowStream st = make_stream(s, row, offset_arg(offset));
          const uint32_t w = st.word(position, index, tag);
          return py::make_tuple(w, uniform_from_bits(w), gumbel_from_bits(w));
        },
        "The random word, uniform and Gumbel variate the ops draw for (batch seed, row, offset, position, index, tag).",
        py::arg("seed"), py::arg("row"), py::arg("offset"), py::arg("position"), py::arg("index"), py::arg("tag"));
  m.def("philox4x32_10",
        [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
          const Philox4 r = philox4x32_10(c0, c1, c2, c3, k0, k1);
          return py::make_tuple(r.x[0], r.x[1], r.x[2], r.x[3]);
        },
        "Philox-4x32-10 of one counter and key.", py::arg("c0"), py::arg("c1"), py::arg("c2"),
        py::arg("c3"), py::arg("k0"), py::arg("k1"));
  m.def("fast_exp", [](float x) { return fast_exp(x); }, "The kernels' exp.", py::arg("x"));
  m.def("fast_log", [](float x) { return fast_log(x); }, "The kernels' log.", py::arg("x"));
}
