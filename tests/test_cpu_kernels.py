"""The blocked int8 kernel: its products against a float64 reference, its layout, its builds and its fallback."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from qwen_asr_worker import cpu_kernels, decode_linears, decode_step, models
from qwen_asr_worker.testing.checkpoints import build_asr_checkpoint
from tests.audio_fixtures import speech_like
from tests.test_fast_decode import LONG, _generate, _load

KERNEL, WHY = cpu_kernels.load()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason=f"no compiled kernels here: {WHY}")


def test_the_kernels_build_where_ci_requires_them() -> None:
    """Every other test here skips without the kernels; CI (`.ci/run`) sets QWEN_ASR_REQUIRE_KERNELS so that a
    build that breaks on its machine fails instead of skipping."""
    if os.environ.get("QWEN_ASR_REQUIRE_KERNELS") != "1":
        pytest.skip("QWEN_ASR_REQUIRE_KERNELS is not set")
    assert KERNEL is not None, WHY


@pytest.fixture(scope="module", params=["native", "haswell"])
def kernels(request: pytest.FixtureRequest) -> cpu_kernels.Kernels:
    """This CPU's build, and the AVX2 one (its vector code never runs on an AVX-512 machine unless built so)."""
    if KERNEL is None:
        pytest.skip(f"no compiled kernels here: {WHY}")
    return KERNEL if request.param == "native" else cpu_kernels.build(march=request.param)


@pytest.fixture
def fresh_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty kernel cache folder and a `load()` that has not run yet; the real cache is back afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_kernels.load.cache_clear()
    yield tmp_path / "qwen-asr-worker"
    cpu_kernels.load.cache_clear()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_asr_checkpoint(tmp_path_factory.mktemp("int8") / "asr", sentence=LONG)


def _quantized(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    scale = torch.rand(n, generator=gen) / 64 + 1e-3
    return weight, scale


def _reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.double() @ weight.double().T * scale.double()


def _assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, roundings: int) -> None:
    """Each output within `roundings` roundings to `dtype` of the exact value (sums are float32: a little more)."""
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-23
    slack = 1e-5 * ref.abs().max().item()  # float32 summation over K terms
    assert ((got.double() - ref).abs() <= roundings * unit * ref.abs() + slack).all()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 48, 49, 80])
def test_products_match_a_float64_reference(dtype: torch.dtype, rows: int) -> None:
    assert KERNEL is not None
    weight, scale = _quantized(40, 96, seed=rows)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(7)).to(dtype)
    got = KERNEL.int8_matmul(x, KERNEL.block(weight), scale)
    assert got.dtype == dtype and got.shape == (rows, 40)
    # Up to MAX_KERNEL_ROWS the kernel rounds once; past it the general product's output, the scale in the
    # activations' dtype and their product are three roundings.
    _assert_close(got, _reference(x, weight, scale), dtype, 1 if rows <= cpu_kernels.MAX_KERNEL_ROWS else 3)


@needs_kernel
def test_decoder_sized_products_and_the_output_projection_in_slices() -> None:
    """The 0.6B model's widest layer (6144 x 1024), and a general product over more rows than one unpacked slice."""
    assert KERNEL is not None
    for n, k, rows in ((6144, 1024, 1), (6144, 1024, 3), (cpu_kernels._UNPACK_ROWS + 8, 64, 60)):
        weight, scale = _quantized(n, k, seed=n)
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        got = KERNEL.int8_matmul(x, KERNEL.block(weight), scale)
        _assert_close(got, _reference(x, weight, scale), torch.bfloat16, 1 if rows <= 48 else 3)


@needs_kernel
def test_blocked_layout_round_trips() -> None:
    assert KERNEL is not None
    weight, _ = _quantized(24, 48, seed=2)
    blocked = KERNEL.block(weight)
    assert blocked.shape == weight.shape and not torch.equal(blocked, weight)
    assert torch.equal(KERNEL.unpack(blocked, 0, 24, torch.float32), weight.float())
    assert torch.equal(KERNEL.unpack(blocked, 5, 11, torch.bfloat16), weight[5:16].to(torch.bfloat16))


@needs_kernel
def test_thread_count_does_not_change_a_bit() -> None:
    assert KERNEL is not None
    weight, scale = _quantized(64, 128, seed=4)
    x = torch.randn(3, 128).to(torch.bfloat16)
    blocked = KERNEL.block(weight)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = KERNEL.int8_matmul(x, blocked, scale)
        torch.set_num_threads(2)
        two = KERNEL.int8_matmul(x, blocked, scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_kernel
def test_the_avx2_build_gives_the_same_products(fresh_load: Path) -> None:
    """The AVX2 code never runs on an AVX-512 machine unless asked for: build it for a Haswell."""
    avx2 = cpu_kernels.build(march="haswell")
    assert avx2.vector_bits == 256
    weight, scale = _quantized(40, 96, seed=9)
    for rows in (1, 2, 3, 7):
        x = torch.randn(rows, 96).to(torch.bfloat16)
        _assert_close(avx2.int8_matmul(x, avx2.block(weight), scale), _reference(x, weight, scale), torch.bfloat16, 1)


def test_a_build_without_vector_code_is_refused(fresh_load: Path) -> None:
    with pytest.raises(cpu_kernels.KernelUnavailable, match=r"no AVX-512 or AVX2\+FMA code for -march=x86-64"):
        cpu_kernels.build(march="x86-64")


@needs_kernel
def test_the_build_is_cached_per_machine(fresh_load: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compiles: list[list[str]] = []
    run = subprocess.run

    def counting(args: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        if "-c" in args or "-shared" in args:
            compiles.append(args)
        return run(args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(cpu_kernels.subprocess, "run", counting)
    monkeypatch.delenv("QWEN_ASR_KERNEL_MARCH", raising=False)
    first, why = cpu_kernels.load()
    assert first is not None, why
    cpu_kernels.load.cache_clear()
    second, _ = cpu_kernels.load()
    assert second is not None and second.path == first.path and first.path.parent == fresh_load
    assert len(compiles) == len(cpu_kernels.SOURCES) + 1  # each source, then the link: once
    assert all("-march=native" in step for step in compiles[:-1])
    # QWEN_ASR_KERNEL_MARCH builds for another CPU: the AVX2 code, here on any x86-64 machine.
    monkeypatch.setenv("QWEN_ASR_KERNEL_MARCH", "haswell")
    cpu_kernels.load.cache_clear()
    avx2, why = cpu_kernels.load()
    assert avx2 is not None and avx2.vector_bits == 256 and avx2.path != first.path, why
    assert all("-march=haswell" in step for step in compiles[len(cpu_kernels.SOURCES) + 1 : -1])


@needs_kernel
def test_the_kernel_runs_on_torchs_openmp_runtime() -> None:
    """The kernel's threads are torch's pool: it needs the runtime torch loaded (by its SONAME), not another copy
    (scikit-learn, which librosa imports, brings its own)."""
    assert KERNEL is not None
    runtime = cpu_kernels._openmp_runtime()
    assert Path(runtime).resolve().is_relative_to(Path(torch.__file__).resolve().parent)

    def dynamic(path: str | Path, tag: str) -> list[str]:
        out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
        return [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if f"({tag})" in line]

    openmp_needed = [name for name in dynamic(KERNEL.path, "NEEDED") if "gomp" in name or "iomp" in name]
    assert openmp_needed == dynamic(runtime, "SONAME")


@needs_kernel
def test_int8_model_uses_the_kernel_and_says_the_same(checkpoint: Path) -> None:
    model = _load(checkpoint, torch.bfloat16, fast=True, quantization="int8")
    layers = [m for m in model.model.thinker.model.modules() if isinstance(m, decode_linears.Int8Linear)]
    assert layers and all(layer.kernel is not None for layer in layers)
    head = model.model.thinker.lm_head  # the tiny vocabulary (517) is no multiple of 4: torch's kernel, as designed
    assert isinstance(head, decode_linears.Int8Linear) and head.out_features % 4 and head.kernel is None
    texts, _ = _generate(model, [speech_like(3.0, seed=1), speech_like(6.0, seed=2)], ["", "a longer context"])
    assert texts == [LONG, LONG]


@needs_kernel
@pytest.mark.parametrize("rows", [1, 4, 60])
def test_the_kernel_and_torchs_kernel_agree_on_a_linear_layer(rows: int) -> None:
    """Same quantization, two kernels: the outputs differ by rounding only."""
    linear = torch.nn.Linear(256, 96, bias=True).to(torch.bfloat16)
    ours, torchs = decode_linears.Int8Linear(linear, KERNEL), decode_linears.Int8Linear(linear)
    assert ours.kernel is KERNEL and torchs.kernel is None
    x = torch.randn(2, rows, 256).to(torch.bfloat16)
    a, b = ours(x).float(), torchs(x).float()
    assert a.shape == b.shape == (2, rows, 96)
    assert (a - b).abs().max().item() <= 0.02 * b.abs().max().item()


def test_without_a_compiler_int8_keeps_torchs_kernel(
    fresh_load: Path,
    checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("CC", str(fresh_load / "no-such-cc"))
    with caplog.at_level(logging.INFO, logger="qwen_asr_worker"):
        model = models.load_asr(
            str(checkpoint), device="cpu", dtype=torch.bfloat16, attn_implementation="sdpa",
            max_inference_batch_size=8, max_new_tokens=300, fast_decode=True, quantization="int8",
        )  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if "CPU decode kernels unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "no C compiler" in warnings[0] and "no-such-cc" in warnings[0]
    layers = [m for m in model.model.modules() if isinstance(m, decode_linears.Int8Linear)]
    assert layers and all(layer.kernel is None for layer in layers)
    note = next(r.getMessage() for r in caplog.records if "fast CPU decode" in r.getMessage())
    assert "int8 per-channel (torch kernel)" in note and "one-step decoder layers (torch operators)" in note
    assert _generate(model, [speech_like(2.0, seed=4)], [""])[0] == [LONG]


# --- the operators between a decoder layer's products --------------------------------------------------------
def _close(got: torch.Tensor, ref: torch.Tensor, roundings: float = 1) -> bool:
    unit = 2.0**-8 if got.dtype == torch.bfloat16 else 2.0**-22
    return bool(((got.double() - ref.double()).abs() <= roundings * unit * ref.double().abs() + 1e-6).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norms_match_qwen_asrs(kernels: cpu_kernels.Kernels, dtype: torch.dtype) -> None:
    x = (3 * torch.randn(2, 1, 6, 40)).to(dtype)  # 40: a tail past the vector width
    per_head = (1 + 0.1 * torch.randn(6, 40)).to(dtype)
    one = (1 + 0.1 * torch.randn(40)).to(dtype)
    assert _close(kernels.rms_norm(x, one, 1e-6), decode_step.rms_norm(x, one, 1e-6))
    assert _close(kernels.rms_norm(x, per_head, 1e-6), decode_step.rms_norm(x, per_head, 1e-6))
    delta = torch.randn(2, 1, 6, 40).to(dtype)
    summed, normed = kernels.add_rms_norm(x, delta, one, 1e-6)
    assert torch.equal(summed, x + delta)  # one rounding of an exact sum: the same bits
    assert _close(normed, decode_step.rms_norm(x + delta, one, 1e-6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("dim", "position"), [(32, 37), (32, 38), (24, 37)])
def test_attention_block_matches_the_torch_operators(
    kernels: cpu_kernels.Kernels, dtype: torch.dtype, masked: bool, dim: int, position: int
) -> None:
    """Norm and rotate the new heads, cache the key and value in place, attend: against the torch operators the
    one-step layer uses without the kernels, on a cache with spare capacity and 8 query heads on 2. Head width 32
    takes the AVX-512 BF16 code where the CPU has it (positions in pairs: 39 is odd), 24 a tail past the vector
    width."""
    from qwen_asr.core.transformers_backend.modeling_qwen3_asr import rotate_half

    batch, heads, kv_heads, capacity = 2, 8, 2, 50
    qkv = torch.randn(batch, 1, (heads + 2 * kv_heads) * dim).to(dtype)
    head_norm = (1 + 0.1 * torch.randn(heads + kv_heads, dim)).to(dtype)
    angles = torch.rand(batch, 1, dim // 2).repeat(1, 1, 2) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    keys, values = (torch.randn(batch, kv_heads, capacity, dim).to(dtype) for _ in range(2))
    keep = torch.ones(batch, position + 1, dtype=torch.bool)
    if masked:
        keep[1, :9] = False  # the second sequence is left-padded
    cached = (keys.clone(), values.clone())
    out = kernels.attend(qkv, head_norm, 1e-6, cos, sin, cached, position, keep if masked else None, dim**-0.5, heads)

    q_k, v = qkv.split([(heads + kv_heads) * dim, kv_heads * dim], dim=-1)
    q_k = decode_step.rms_norm(q_k.view(batch, 1, heads + kv_heads, dim), head_norm, 1e-6)
    q_k = q_k * cos.unsqueeze(2) + rotate_half(q_k) * sin.unsqueeze(2)
    query, key = q_k[:, :, :heads].transpose(1, 2), q_k[:, :, heads:].transpose(1, 2)
    keys[:, :, position], values[:, :, position] = key[:, :, 0], v.view(batch, kv_heads, dim)
    assert _close(cached[0][:, :, position], keys[:, :, position], roundings=3)  # the new key (norm: float32 sums)
    assert torch.equal(cached[1], values)  # the new value is copied as it is
    others = [p for p in range(capacity) if p != position]
    assert torch.equal(cached[0][:, :, others], keys[:, :, others])  # nothing else touched
    mask = keep.view(batch, 1, 1, position + 1) if masked else None
    expected, _ = decode_step.decode_attention(
        torch.nn.Module(), query, keys[:, :, : position + 1], values[:, :, : position + 1], mask, scaling=dim**-0.5
    )
    assert out.shape == (batch, heads * dim)
    # An output is a weighted mean of values: its error scales with the values, not with itself (torch's bf16
    # attention rounds the weights to bf16 before that sum; this one does not).
    unit = 2.0**-8 if dtype == torch.bfloat16 else 1e-6
    error = (out.double() - expected.reshape(batch, heads * dim).double()).abs().max().item()
    assert error <= unit * values.abs().max().item()


def test_a_cache_folder_others_can_write_is_passed_over(fresh_load: Path) -> None:
    """A compiled library is loaded from the cache folder, so one that others can write to (a planted library
    would run in the worker) is not used: the per-user temp folder is taken instead."""
    fresh_load.mkdir(parents=True)
    fresh_load.chmod(0o777)
    chosen = cpu_kernels._cache_dir()
    assert chosen != fresh_load and chosen.name == f"qwen-asr-worker-{os.getuid()}"
    assert not chosen.stat().st_mode & 0o022


def _attention_inputs(dtype: torch.dtype) -> dict:
    batch, heads, kv_heads, dim = 1, 4, 2, 32
    angles = torch.rand(batch, 1, dim // 2).repeat(1, 1, 2)
    return {
        "qkv": torch.randn(batch, 1, (heads + 2 * kv_heads) * dim).to(dtype),
        "head_norm": torch.ones(heads + kv_heads, dim).to(dtype),
        "eps": 1e-6,
        "cos": angles.cos().to(dtype),
        "sin": angles.sin().to(dtype),
        "caches": tuple(torch.randn(batch, kv_heads, 300, dim).to(dtype) for _ in range(2)),
        "position": 250,
        "keep": None,
        "scaling": dim**-0.5,
        "heads": heads,
    }


@needs_kernel
def test_attention_gives_the_same_bits_on_one_thread_and_two() -> None:
    """Each thread scores into its own slice of the work space: a shared one would change the results."""
    assert KERNEL is not None
    inputs = _attention_inputs(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        outs = []
        for count in (1, 2):
            torch.set_num_threads(count)
            caches = tuple(c.clone() for c in inputs["caches"])
            outs.append(KERNEL.attend(**{**inputs, "caches": caches}))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_nan_in_attention_comes_out_as_nan(dtype: torch.dtype) -> None:
    """As torch's attention would: a NaN query head's output is NaN, not a quiet 0; the other heads, including the
    one sharing its key/value head, are finite."""
    assert KERNEL is not None
    inputs = _attention_inputs(dtype)
    inputs["qkv"][0, 0, 5] = float("nan")  # query head 0
    out = KERNEL.attend(**inputs).view(4, 32)
    assert out[0].isnan().all() and out[1:].isfinite().all()


def test_the_growing_cache_hands_out_slots_past_its_capacity() -> None:
    """`open_slot` grows the buffers when the next position does not fit; what was cached stays, and the views
    `keys`/`values` (what transformers reads for the cache's length) follow `close_slot`."""
    layer = decode_step.growing_layer_class()(spare=1)
    prompt = torch.randn(1, 2, 5, 8)
    layer.update(prompt, prompt + 1)
    written = []
    for step in range(12):
        keys, values, position = layer.open_slot()
        assert position == 5 + step and keys.shape[2] > position and keys.shape == values.shape
        keys[:, :, position] = step
        values[:, :, position] = -step
        layer.close_slot()
        written.append(step)
    assert layer.get_seq_length() == 17
    assert torch.equal(layer.keys[:, :, :5], prompt) and torch.equal(layer.values[:, :, :5], prompt + 1)
    assert torch.equal(layer.keys[0, 0, 5:, 0], torch.tensor(written, dtype=torch.float32))
    assert torch.equal(layer.values[0, 1, 5:, 3], -torch.tensor(written, dtype=torch.float32))


@needs_kernel
def test_a_damaged_cached_library_is_built_again(tmp_path: Path) -> None:
    """In fresh processes (a process that has the library loaded keeps its mapping): build, damage the cached file,
    load again."""
    import sys

    probe = "from qwen_asr_worker import cpu_kernels; k, why = cpu_kernels.load(); print(k.path if k else why)"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}

    def load_in_a_new_process() -> str:
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    path = Path(load_in_a_new_process())
    assert path.is_file() and path.parent == tmp_path / "qwen-asr-worker"
    path.write_bytes(b"not a shared library")
    assert load_in_a_new_process() == str(path)
    assert path.read_bytes()[:4] == b"\x7fELF"


@needs_kernel
def test_a_library_that_cannot_be_loaded_is_reported_not_raised(
    fresh_load: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache folder on a noexec mount, say: LoadModel must go on with torch's operators, not fail."""

    def refuse(path: str, *args: object, **kwargs: object) -> None:
        raise OSError(f"{path}: failed to map segment from shared object")

    monkeypatch.setattr(cpu_kernels.ctypes, "CDLL", refuse)
    kernels, why = cpu_kernels.load()
    assert kernels is None and "could not be loaded" in why and "failed to map segment" in why


@needs_kernel
def test_the_int8_product_refuses_inputs_it_would_read_past() -> None:
    assert KERNEL is not None
    weight, scale = _quantized(8, 32, seed=1)
    blocked, x = KERNEL.block(weight), torch.randn(2, 32).to(torch.bfloat16)
    for bad in (
        (x, blocked, scale.to(torch.bfloat16)),  # a model converted with .to() after loading
        (x[:, :16], blocked, scale),
        (x.to(torch.float16), blocked, scale),
        (x, blocked, scale[:4]),
        (torch.randn(2, 24).to(torch.bfloat16), torch.zeros(8, 24, dtype=torch.int8), scale),  # not blockable
    ):
        with pytest.raises(ValueError, match="int8 kernel inputs"):
            KERNEL.int8_matmul(*bad)


def test_without_a_home_folder_the_cache_is_the_temp_one(fresh_load: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A container running as an arbitrary uid may have no home: the per-user temp folder is used."""
    monkeypatch.delenv("XDG_CACHE_HOME")

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(cpu_kernels.Path, "home", staticmethod(no_home))
    assert cpu_kernels._cache_dir().name == f"qwen-asr-worker-{os.getuid()}"


# --- the blocked bf16 product ---------------------------------------------------------------------------------------

# The decoder's products, (out, in), q/k/v and gate/up stacked, then the output projection: for the 0.6B model and
# the 1.7B (dimensions from the published configurations, as antirez/qwen-asr's MODEL.md lists them).
DECODER_SHAPES = {
    "0.6B": [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (151936, 1024)],
    "1.7B": [(4096, 2048), (2048, 2048), (12288, 2048), (2048, 6144), (151936, 2048)],
}


def _bf16_weight(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16) / k**0.5


def _assert_bf16_close(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """Within one rounding to the output's dtype of the exact product, plus float32 summation's error: K terms,
    each below |x| |w|, so at most K * 2^-24 * sum(|x| |w|) (a loose bound; the sums here are of random signs)."""
    ref = x.double() @ weight.double().T
    magnitude = x.double().abs() @ weight.double().abs().T
    unit = 2.0**-8 if got.dtype == torch.bfloat16 else 2.0**-24
    summation = x.shape[1] * 2.0**-24 * magnitude
    assert ((got.double() - ref).abs() <= unit * ref.abs() + summation).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 48, 49, 80])
def test_bf16_products_match_a_float64_reference(kernels: cpu_kernels.Kernels, dtype: torch.dtype, rows: int) -> None:
    """Both builds, 1-80 rows of input: the kernel up to MAX_KERNEL_ROWS, a float32 product over unpacked slices past
    it; in bf16 or float32 activations."""
    weight = _bf16_weight(40, 96, seed=rows)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(7)).to(dtype)
    got = kernels.bf16_matmul(x, kernels.block(weight))
    assert got.dtype == dtype and got.shape == (rows, 40)
    _assert_bf16_close(got, x, weight)


@pytest.mark.parametrize("model", sorted(DECODER_SHAPES))
def test_bf16_products_at_the_decoders_shapes(kernels: cpu_kernels.Kernels, model: str) -> None:
    for n, k in DECODER_SHAPES[model]:
        weight = _bf16_weight(n, k, seed=n + k)
        blocked = kernels.block(weight)
        for rows in (1, 3):
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).float()
            _assert_bf16_close(kernels.bf16_matmul(x, blocked), x, weight)


def test_bf16_layout_round_trips(kernels: cpu_kernels.Kernels) -> None:
    weight = _bf16_weight(24, 48, seed=2)
    blocked = kernels.block(weight)
    assert blocked.dtype == torch.bfloat16 and not torch.equal(blocked, weight)
    assert torch.equal(kernels.unpack(blocked, 0, 24, torch.float32), weight.float())
    assert torch.equal(kernels.unpack(blocked, 5, 11, torch.bfloat16), weight[5:16])


def test_the_bf16_product_keeps_its_bits_across_threads_and_nan(kernels: cpu_kernels.Kernels) -> None:
    weight = _bf16_weight(64, 128, seed=4)
    blocked = kernels.block(weight)
    x = torch.randn(3, 128)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.bf16_matmul(x, blocked)
        torch.set_num_threads(2)
        two = kernels.bf16_matmul(x, blocked)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    x[1, 5] = float("nan")
    out = kernels.bf16_matmul(x.bfloat16(), blocked)
    assert out[1].isnan().all() and not out[[0, 2]].isnan().any()


@needs_kernel
def test_the_bf16_product_refuses_inputs_it_would_read_past() -> None:
    assert KERNEL is not None
    weight = _bf16_weight(8, 32, seed=1)
    blocked, x = KERNEL.block(weight), torch.randn(2, 32)
    odd = (torch.randn(2, 24), torch.zeros(8, 24, dtype=torch.bfloat16))  # a width the blocked layout does not take
    for bad in ((x[:, :16], blocked), (x.to(torch.float16), blocked), (x, blocked.float()), (x.t(), blocked), odd):
        with pytest.raises(ValueError, match="bf16 kernel inputs"):
            KERNEL.bf16_matmul(*bad)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_bf16_linear_layer_agrees_with_f_linear(dtype: torch.dtype) -> None:
    """`Bf16Linear` in a model's place: 3-D input, a bias, a shape the layout does not take (row-major then)."""
    assert KERNEL is not None
    for n, k, bias in ((40, 96, True), (42, 96, False), (40, 90, True)):
        linear = torch.nn.Linear(k, n, bias=bias)
        with torch.no_grad():
            linear.weight.copy_(_bf16_weight(n, k, seed=n).float())
        layer = decode_linears.Bf16Linear(linear.to(dtype), KERNEL)
        assert (layer.kernel is not None) is cpu_kernels.Kernels.fits(n, k)
        x = torch.randn(2, 5, k).to(dtype)
        reference_bias = linear.bias.double() if bias else None
        expected = torch.nn.functional.linear(x.double(), linear.weight.double(), reference_bias)
        got = layer(x)
        assert got.dtype == dtype and got.shape == (2, 5, n)
        tolerance = (2.0**-7 if dtype == torch.bfloat16 else 1e-5) * expected.abs().max().item()
        assert (got.double() - expected).abs().max().item() <= tolerance
