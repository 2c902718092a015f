"""The C decode kernels of `cpu.c`: built once per machine, called through ctypes.

The library is compiled on first use with the system C compiler (`$CC`, else `cc`) for this
CPU (`-march=native`; with AVX-512 forced off by LLMSCALE_CPU_ISA=avx2, `-mno-avx512f` too, so
the AVX2 code is what runs) and cached under `$LLMSCALE_CACHE/kernels/`, keyed by the source,
the compiler flags and the CPU's feature flags. Where it cannot be built (no compiler, no
AVX2/FMA, not x86-64, LLMSCALE_CPU_ISA=none) or `LLMSCALE_CPU_KERNELS=0`, `available()` is
False and callers use torch's ops.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from llmscale.config import cpu_flags
from llmscale.paths import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu.c")
FLAGS = ["-O3", "-fno-math-errno", "-march=native", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
QBLOCK = 32  # activation quantization block of the int8/int4 kernels
PANEL = 16  # output rows per panel of `pack_panels`

_P = ctypes.c_void_p
_I = ctypes.c_int64
_SIGNATURES = {
    "matmul_f32": [_P, _I, _I, _P, _I, _P, ctypes.c_int],
    "matmul_bf16": [_P, _I, _I, _P, _I, _P, ctypes.c_int],
    "matmul_panels_f32": [_P, _I, _I, _P, _I, _P, ctypes.c_int, ctypes.c_int],
    "matmul_panels_bf16": [_P, _I, _I, _P, _I, _P, ctypes.c_int, ctypes.c_int],
    "matmul_int8": [_P, _I, _I, _P, _P, _I, _P, ctypes.c_int],
    "matmul_int4": [_P, _I, _I, _I, _P, _P, _P, _I, _P, ctypes.c_int],
    "dequant_int8": [_P, _P, _I, _I, _P, ctypes.c_int],
    "dequant_int4": [_P, _P, _P, _I, _I, _I, _P, ctypes.c_int],
    "rms_norm": [_P, _P, _I, _I, _P, ctypes.c_float, _P, _P],
    "rms_norm_bf16": [_P, _P, _I, _I, _P, ctypes.c_float, _P, _P],
    "paged_decode_attention": [_P, _I, _I, _I, _I, _P, _P, ctypes.c_int, _I, _P, _I, _P, ctypes.c_float, _P,
                               ctypes.c_int],
    "prefill_attention": [_P, _I, _I, _I, _I, _I, _P, _I, ctypes.c_int, _P, _I, ctypes.c_int, _I,
                          ctypes.c_float, _P, _P, ctypes.c_int, ctypes.c_int],
    "prefill_attention_workspace": [_I, _I, _I, ctypes.c_int],
    "rope_and_cache": [_P, ctypes.c_int, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int],
    "silu_and_mul": [_P, _I, _I, _P],
    "argmax_rows": [_P, _I, _I, _P, ctypes.c_int],
    "shm_wait": [_P, _I, ctypes.c_int, ctypes.c_int, _I, _I],
    "shm_publish": [_P, ctypes.c_int, _I],
    "shm_sum": [_P, _I, ctypes.c_int, _I, ctypes.c_int, _P],
    "bind_threads": [_P, ctypes.c_int],
    "decode_step": [_P, _P, _I, _P, _P, _P, _I, _P, _P, ctypes.c_int],
    "vector_bits": [],
}
# Built only where the CPU has the instructions they need.
_OPTIONAL_SIGNATURES = {
    "matmul_pair_panels_bf16": [_P, ctypes.c_int, _I, _I, _P, _I, _P, ctypes.c_int, ctypes.c_int,
                                ctypes.c_int],  # AVX-512 BF16
}


def compile_flags(flags: frozenset[str]) -> list[str]:
    """The compiler's flags for a CPU with these feature flags (`config.cpu_flags`: capped by
    LLMSCALE_CPU_ISA): without avx512f, `cpu.c` compiles its AVX2 code even on an AVX-512 CPU."""
    return FLAGS + ([] if "avx512f" in flags else ["-mno-avx512f"])


def _build(compiler: str, flags: frozenset[str]) -> Path:
    cc_flags = compile_flags(flags)
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(cc_flags + sorted(flags)).encode()).hexdigest()
    target = cache_root() / "kernels" / f"cpu-{key[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *cc_flags, "-o", tmp, str(SOURCE)], check=True, capture_output=True,
                       text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(flags: frozenset[str]) -> ctypes.CDLL:
    """The kernels built for a CPU with these feature flags (once per machine), their signatures
    set; raises OSError or CalledProcessError where they cannot be built. `library()` is the
    one for this CPU; benchmarks load another level's beside it."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise OSError("no C compiler found")
    # torch is imported above, so the OpenMP runtime the library needs is torch's own
    # (same soname): one thread pool, not two competing for the cores.
    lib = ctypes.CDLL(str(_build(compiler, flags)))
    built = {name: argtypes for name, argtypes in _OPTIONAL_SIGNATURES.items() if hasattr(lib, name)}
    for name, argtypes in {**_SIGNATURES, **built}.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None
    lib.bind_threads.restype = ctypes.c_int
    lib.shm_wait.restype = ctypes.c_int
    lib.prefill_attention_workspace.restype = ctypes.c_int64
    lib.vector_bits.restype = ctypes.c_int
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    if os.environ.get("LLMSCALE_CPU_KERNELS", "1") == "0":
        return None
    flags = cpu_flags()
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma"} <= flags:
        return None
    if shutil.which(os.environ.get("CC", "cc")) is None:
        log.warning("no C compiler found: decode matmuls use torch's kernels")
        return None
    try:
        return load(flags)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("building the CPU kernels failed, using torch's: %s", detail.strip()[:500])
        return None


def vector_bits() -> int:
    """The vector width the kernels were compiled for: 512 (their AVX-512 matmuls) or 256
    (AVX2 throughout); 0 where they are not built."""
    lib = library()
    return 0 if lib is None else lib.vector_bits()


def available() -> bool:
    return library() is not None


def pair_panels_available() -> bool:
    """Whether the kernels multiply bf16 pairs (AVX-512 BF16 here): `matmul_pair_panels`."""
    lib = library()
    return lib is not None and hasattr(lib, "matmul_pair_panels_bf16")


def fits_pair_panels(weight: torch.Tensor) -> bool:
    """Whether `weight` [n, k] can be multiplied in pair panels here: bf16, whole pairs of panels
    (n % 32 == 0), k even, and the kernel built for this CPU."""
    n, k = weight.shape
    return weight.dtype == torch.bfloat16 and n % (2 * PANEL) == 0 and k % 2 == 0 and pair_panels_available()


def usable(*tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """Whether the kernels can run on these CPU tensors of `dtypes` (they are not differentiable)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.device.type == "cpu" and t.dtype in dtypes for t in tensors) and available()


def _out(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.empty(x.shape[0], n, dtype=torch.float32)


def matmul_dense(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x fp32 [m, k] contiguous, w fp32 or bf16 [n, k] contiguous, k % 8 == 0 -> fp32 [m, n]."""
    lib = library()
    n, k = w.shape
    y = _out(x, n)
    fn = lib.matmul_f32 if w.dtype == torch.float32 else lib.matmul_bf16
    fn(x.data_ptr(), x.shape[0], k, w.data_ptr(), n, y.data_ptr(), torch.get_num_threads())
    return y


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """[n, k] -> [ceil(n / PANEL), k, PANEL]: PANEL output rows side by side along k, the last
    panel zero-padded; the operand of `matmul_panels`. bf16 weights stay bf16, others become fp32."""
    n, k = weight.shape
    w = weight.detach()
    padded = F.pad(w if w.dtype == torch.bfloat16 else w.float(), (0, 0, 0, -n % PANEL))
    return padded.view(-1, PANEL, k).transpose(1, 2).contiguous()


def is_panels(packed: torch.Tensor) -> bool:
    """Whether a prepacked weight is `pack_panels`' (3-D) rather than oneDNN's (2-D)."""
    return packed.dim() == 3 and packed.shape[2] == PANEL


def _panels(x: torch.Tensor, packed: torch.Tensor, n: int, swiglu: bool) -> torch.Tensor:
    y = _out(x, n // 2 if swiglu else n)
    lib = library()
    kernel = lib.matmul_panels_bf16 if packed.dtype == torch.bfloat16 else lib.matmul_panels_f32
    kernel(x.data_ptr(), x.shape[0], packed.shape[1], packed.data_ptr(), n, y.data_ptr(), int(swiglu),
           torch.get_num_threads())
    return y


def matmul_panels(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """x fp32 [m, k] contiguous, packed = pack_panels(w) for w [n, k] (fp32 or bf16) -> fp32
    [m, n], any m."""
    return _panels(x, packed, n, swiglu=False)


def pack_swiglu_panels(gate_up: torch.Tensor) -> torch.Tensor:
    """A gate-up weight [2 i, k] (gate rows, then up rows; i % 8 == 0) packed as `pack_panels`
    with each panel holding 8 gate rows and the 8 matching up rows: the operand of
    `matmul_swiglu_panels`."""
    two_i, k = gate_up.shape
    interleaved = gate_up.detach().view(2, two_i // 16, 8, k).transpose(0, 1).reshape(two_i, k)
    return pack_panels(interleaved)


def pack_pair_panels(panels: torch.Tensor) -> torch.Tensor:
    """bf16 panels of `pack_panels` or `pack_swiglu_panels`, [P, k, PANEL] with k even ->
    [P, k / 2, 2 PANEL]: each step along k holds two, every output's two weights side by side,
    the operand of `matmul_pair_panels`."""
    p, k, _ = panels.shape
    return panels.view(p, k // 2, 2, PANEL).transpose(2, 3).reshape(p, k // 2, 2 * PANEL).contiguous()


def matmul_pair_panels(x: torch.Tensor, packed: torch.Tensor, n: int, swiglu: bool = False,
                       out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x fp32 or bf16 [m, k] contiguous, packed = pack_pair_panels(pack_panels(w)) for a bf16
    w [n, k] (n % 32 == 0; with `swiglu`, of pack_swiglu_panels(w)) -> [m, n] (or [m, n / 2]) in
    `out_dtype` (fp32 or bf16): x rounded to bf16, products summed in fp32 two at a time, the sums
    rounded to bf16 for a bf16 output as `.to(torch.bfloat16)` rounds them. Needs
    `pair_panels_available()`."""
    y = torch.empty(x.shape[0], n // 2 if swiglu else n, dtype=out_dtype)
    library().matmul_pair_panels_bf16(x.data_ptr(), int(x.dtype == torch.bfloat16), x.shape[0],
                                      2 * packed.shape[1], packed.data_ptr(), n, y.data_ptr(),
                                      int(out_dtype == torch.bfloat16), int(swiglu), torch.get_num_threads())
    return y


def matmul_swiglu_panels(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x fp32 [m, k] contiguous, packed = pack_swiglu_panels(w) -> silu(x gate^T) * (x up^T),
    fp32 [m, i], bit for bit `silu_and_mul(matmul_panels(x, pack_panels(w), 2 i))`."""
    return _panels(x, packed, packed.shape[0] * PANEL, swiglu=True)


def matmul_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x fp32 [m, k] contiguous, q int8 [n, k], scale fp32 [n]; k % 32 == 0 -> fp32 [m, n]."""
    n, k = q.shape
    y = _out(x, n)
    library().matmul_int8(x.data_ptr(), x.shape[0], k, q.data_ptr(), scale.data_ptr(), n,
                          y.data_ptr(), torch.get_num_threads())
    return y


def matmul_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x fp32 [m, k] contiguous, packed uint8 [n, k/2] (low nibble first), scale and zero
    fp32 [n, k/group] with w = (q - 8) * scale + zero; group % 32 == 0 -> fp32 [m, n]."""
    n = packed.shape[0]
    k = x.shape[1]
    y = _out(x, n)
    library().matmul_int4(x.data_ptr(), x.shape[0], k, group_size, packed.data_ptr(),
                          scale.data_ptr(), zero.data_ptr(), n, y.data_ptr(),
                          torch.get_num_threads())
    return y


def bind_threads(cores: list[int]) -> bool:
    """Pin the calling thread's OpenMP team (torch's intra-op threads too: one runtime), thread i
    to cores[i], and size torch's pool to match. False where the kernels are not built."""
    lib = library()
    if lib is None:
        return False
    torch.set_num_threads(len(cores))
    ids = (ctypes.c_int64 * len(cores))(*cores)
    return lib.bind_threads(ids, len(cores)) == len(cores)


def dequant_int8(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """q int8 [n, k] contiguous, scale fp32 [n], k % 8 == 0 -> out fp32 [n, k] = q * scale."""
    n, k = q.shape
    library().dequant_int8(q.data_ptr(), scale.data_ptr(), n, k, out.data_ptr(), torch.get_num_threads())
    return out


def dequant_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                 out: torch.Tensor) -> torch.Tensor:
    """packed uint8 [n, k/2] contiguous rows, scale and zero fp32 [n, k/group] -> out fp32
    [n, k] = (q - 8) * scale + zero; group % 32 == 0."""
    n, k = out.shape
    library().dequant_int4(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), n, k, group_size,
                           out.data_ptr(), torch.get_num_threads())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[m, k] contiguous, k % 8 == 0, x, weight and residual all fp32 or all bf16 (rounded where
    torch's bf16 RMSNorm rounds). Returns (the normalised input, the input), where the input is
    x + residual when a residual is given."""
    m, k = x.shape
    out = torch.empty_like(x)
    total = x if residual is None else torch.empty_like(x)
    kernel = library().rms_norm_bf16 if x.dtype == torch.bfloat16 else library().rms_norm
    kernel(x.data_ptr(), None if residual is None else residual.data_ptr(), m, k, weight.data_ptr(), eps,
           total.data_ptr(), out.data_ptr())
    return out, total


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float
                           ) -> torch.Tensor:
    """q [b, hq, d] fp32 contiguous; caches [blocks, block_size, hkv, d] fp32 or bf16 (read as
    they are, summed in fp32); block_tables [b, max_blocks] and context_lens [b] int64 ->
    fp32 [b, hq, d]."""
    b, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    out = torch.empty_like(q)
    library().paged_decode_attention(
        q.data_ptr(), b, hq, hkv, d, k_cache.data_ptr(), v_cache.data_ptr(),
        int(k_cache.dtype == torch.bfloat16), block_size, block_tables.data_ptr(), block_tables.shape[1],
        context_lens.data_ptr(), scale, out.data_ptr(), torch.get_num_threads())
    return out


def prefill_attention_workspace(length: int, num_kv_heads: int, head_dim: int) -> int:
    """Floats of scratch memory `prefill_attention` needs for `length` keys."""
    return library().prefill_attention_workspace(length, num_kv_heads, head_dim, torch.get_num_threads())


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      work: torch.Tensor | None = None, bf16_dots: bool = False) -> torch.Tensor:
    """Causal attention of a prompt chunk: q [n, hq, d] against k, v [len, hkv, d] (len >= n,
    the chunk's own keys last), fp32, each head's values contiguous -> [n, hq, d]. `work`: fp32
    scratch of at least `prefill_attention_workspace` floats, which the caller may reuse.
    `bf16_dots` (for bf16 activations, where `pair_panels_available()` and d % 32 == 0): q * scale,
    K, the probabilities and V rounded to bf16 and multiplied two products a lane, fp32 sums, as
    torch's bf16 attention rounds them; k and v may then be bf16, read as they are. Else fp32
    throughout."""
    n, hq, d = q.shape
    length, hkv, _ = k.shape
    assert all(t.stride(2) == 1 and t.stride(1) == d for t in (q, k, v)), "heads must be contiguous"
    pairs = bf16_dots and d % 32 == 0 and pair_panels_available()  # else the fp32 kernel runs
    assert q.dtype == torch.float32 and (pairs or k.dtype == v.dtype == torch.float32), (k.dtype, v.dtype)
    if work is None:
        work = torch.empty(prefill_attention_workspace(length, hkv, d), dtype=torch.float32)
    out = torch.empty((n, hq, d), dtype=torch.float32)
    library().prefill_attention(q.data_ptr(), q.stride(0), n, hq, hkv, d, k.data_ptr(), k.stride(0),
                                int(k.dtype == torch.bfloat16), v.data_ptr(), v.stride(0),
                                int(v.dtype == torch.bfloat16), length, scale, out.data_ptr(),
                                work.data_ptr(), int(bf16_dots), torch.get_num_threads())
    return out


def rope_and_cache(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, cos: torch.Tensor,
                   sin: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary on q and k of a packed qkv [t, (hq + 2 hkv) d] (fp32 or bf16, contiguous), k and v
    written to the caches (fp32, or bf16 rounded to nearest even) at `slots`. Returns (q
    [t, hq, d], k [t, hkv, d]) in fp32; d % 16 == 0."""
    t = qkv.shape[0]
    d = cos.shape[1]
    q = torch.empty(t, num_heads, d, dtype=torch.float32)
    k = torch.empty(t, num_kv_heads, d, dtype=torch.float32)
    assert qkv.is_contiguous() and qkv.dtype in (torch.float32, torch.bfloat16), (qkv.dtype, qkv.stride())
    library().rope_and_cache(qkv.data_ptr(), int(qkv.dtype == torch.bfloat16), t, num_heads, num_kv_heads, d,
                             cos.data_ptr(), sin.data_ptr(), positions.data_ptr(), slots.data_ptr(),
                             k_cache.data_ptr(), v_cache.data_ptr(), q.data_ptr(), k.data_ptr(),
                             int(k_cache.dtype == torch.bfloat16))
    return q, k


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x fp32 [m, n] contiguous -> int64 [m]: `x.argmax(dim=-1)`, the first of equal values or
    the first NaN, the rows in parallel."""
    assert x.dtype == torch.float32 and x.is_contiguous(), (x.dtype, x.stride())
    m, n = x.shape
    out = torch.empty(m, dtype=torch.int64)
    library().argmax_rows(x.data_ptr(), m, n, out.data_ptr(), torch.get_num_threads())
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[m, 2 i] fp32 contiguous -> silu(gate) * up [m, i]; i % 8 == 0."""
    m, width = gate_up.shape
    out = torch.empty(m, width // 2, dtype=torch.float32)
    library().silu_and_mul(gate_up.data_ptr(), m, width // 2, out.data_ptr())
    return out
