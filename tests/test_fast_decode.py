"""The fast CPU decode path: the same greedy tokens as qwen-asr's stock path, its pieces, and its fallback."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from qwen_asr_worker import cpu_kernels, decode_linears, decode_step, fast_decode, models
from qwen_asr_worker.errors import InvalidRequest
from qwen_asr_worker.testing.checkpoints import TINY_ASR, build_asr_checkpoint
from tests.audio_fixtures import speech_like
from tests.conftest import SENTENCE, Harness

LONG = "Alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa"


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint that says a longer sentence (more decode steps, a cache that must grow)."""
    return build_asr_checkpoint(tmp_path_factory.mktemp("fast") / "asr", sentence=LONG)


def packing_problem(dtype: torch.dtype) -> str:
    """Why the fast path's linears cannot run on this CPU in `dtype` ("" when they can), as the load itself decides
    it. oneDNN packs bf16 only with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT; elsewhere our blocked bf16 kernel stands
    in, so only a CPU without AVX2 and FMA (or without a compiler) loads bf16 on the stock path."""
    return fast_decode.kernels_available(dtype, "none")


FAST_LINEARS = (decode_linears.PackedLinear, decode_linears.Bf16Linear)


def _needs_packing(dtype: torch.dtype) -> None:
    problem = packing_problem(dtype)
    if problem:
        kernels = cpu_kernels.load()[1] or "built, but not for this dtype"
        pytest.skip(f"neither oneDNN nor our kernels multiply {dtype} here (oneDNN: {problem}; our kernels: {kernels})")


def _load(
    path: Path,
    dtype: torch.dtype,
    *,
    fast: bool,
    quantization: str = "none",
    tokens: int = 300,
    attn: str = "sdpa",
    bf16_weights: bool = False,
) -> Any:
    return models.load_asr(
        str(path),
        device="cpu",
        dtype=dtype,
        attn_implementation=attn,
        max_inference_batch_size=8,
        max_new_tokens=tokens,
        fast_decode=fast,
        quantization=quantization,
        bf16_weights=bf16_weights,
    )


def _padded_batch() -> tuple[list[np.ndarray], list[str]]:
    """Two clips of different lengths and contexts in one batch: padding, so the attention mask is exercised too."""
    contexts = ["", "a much longer context that pads the other prompt"]
    return [speech_like(3.0, seed=1), speech_like(7.5, seed=2)], contexts


def _generate(
    model: Any, clips: list[np.ndarray], contexts: list[str], *, logits: bool = False
) -> tuple[list[str], torch.Tensor]:
    """Transcribe and return the texts and the generated token ids (prompt included), or with `logits` every
    step's logits, (steps, batch, vocab)."""
    seen: list[torch.Tensor] = []
    generate = model.model.generate

    def recording(*args: Any, **kwargs: Any) -> Any:
        out = generate(*args, **kwargs, **({"output_logits": True} if logits else {}))
        seen.append(torch.stack(out.logits) if logits else out.sequences)
        return out

    model.model.generate = recording
    try:
        results = model.transcribe(audio=[(c, 16000) for c in clips], context=contexts)
    finally:
        model.model.generate = generate
    return [r.text for r in results], torch.cat(seen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_tokens_identical_to_the_stock_path(long_checkpoint: Path, dtype: torch.dtype) -> None:
    clips, contexts = _padded_batch()
    stock_texts, stock_ids = _generate(_load(long_checkpoint, dtype, fast=False), clips, contexts)
    fast = _load(long_checkpoint, dtype, fast=True)
    # Where the CPU cannot pack this dtype the load keeps the stock path (and says so: tested below), and says the
    # same; where it can, the packed path must say the same.
    packed = any(isinstance(m, FAST_LINEARS) for m in fast.model.modules())
    assert packed is not bool(packing_problem(dtype))
    fast_texts, fast_ids = _generate(fast, clips, contexts)
    assert stock_texts == fast_texts == [LONG, LONG]
    assert stock_ids.shape[1] > 300  # a long generation; cache growth itself is tested on the cache layer below
    assert torch.equal(stock_ids, fast_ids)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_eager_attention_keeps_its_own_cache_and_says_the_same(long_checkpoint: Path, dtype: torch.dtype) -> None:
    """A decoder on transformers' eager attention keeps it and the stock cache (the in-place cache is built for our
    single-query attention only); the packed linears still apply. (qwen-asr leaves the decoder
    on SDPA even for attn_implementation:eager, so the config is set here directly.)"""
    _needs_packing(dtype)
    clips = [speech_like(3.0, seed=5)]
    models_ = [_load(long_checkpoint, dtype, fast=False) for _ in range(2)]
    for model in models_:
        model.model.thinker.model.config._attn_implementation = "eager"
    stock, fast = models_
    note = fast_decode.accelerate_decoder(fast.model, device="cpu", dtype=dtype)
    assert note.startswith("fast CPU decode")
    assert fast.model.thinker.model.config._attn_implementation == "eager"
    stock_texts, stock_ids = _generate(stock, clips, [""])
    fast_texts, fast_ids = _generate(fast, clips, [""])
    assert fast_texts == stock_texts == [LONG]
    assert torch.equal(fast_ids, stock_ids)


def test_int8_says_the_same_and_halves_the_decoder(long_checkpoint: Path) -> None:
    clip = [speech_like(4.0, seed=3)]
    stock = _load(long_checkpoint, torch.bfloat16, fast=False)
    int8 = _load(long_checkpoint, torch.bfloat16, fast=True, quantization="int8")
    assert any(isinstance(m, decode_linears.Int8Linear) for m in int8.model.modules())
    stock_texts, stock_ids = _generate(stock, clip, [""])
    int8_texts, int8_ids = _generate(int8, clip, [""])
    assert int8_texts == stock_texts == [LONG]
    assert torch.equal(int8_ids, stock_ids)  # the scripted wiring has wide margins; real weights may differ
    layer = next(m for m in int8.model.modules() if isinstance(m, decode_linears.Int8Linear))
    assert layer.weight_int8.dtype == torch.int8 and layer.scale.shape == (layer.out_features,)


def _without_onednn_packing(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(*args: object) -> None:
        raise AttributeError("'_OpNamespace' 'mkldnn' object has no attribute '_reorder_linear_weight'")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", missing)


def test_missing_kernels_fall_back_to_the_stock_path(
    long_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No oneDNN packing and no compiled kernels (no compiler, or no AVX2): the stock path, with one warning."""
    _without_onednn_packing(monkeypatch)
    monkeypatch.setattr(fast_decode, "bf16_kernel", lambda: None)
    with caplog.at_level(logging.INFO, logger="qwen_asr_worker"):
        model = _load(long_checkpoint, torch.bfloat16, fast=True)
    warnings = [r.getMessage() for r in caplog.records if "fast CPU decode unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "_reorder_linear_weight" in warnings[0]
    assert not any(isinstance(m, FAST_LINEARS) for m in model.model.modules())
    assert isinstance(model.model.thinker.lm_head, nn.Linear)
    assert _generate(model, [speech_like(2.0, seed=4)], [""])[0] == [LONG]


@pytest.mark.skipif(cpu_kernels.load()[0] is None, reason=f"no compiled kernels here: {cpu_kernels.load()[1]}")
def test_without_onednn_packing_bf16_takes_our_blocked_kernel(
    long_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where oneDNN packs no bf16 (an AVX2-only CPU, here forced on any CPU), the decoder's linears and the output
    projection hold their bf16 weights in our blocked layout, and greedy tokens stay the stock path's."""
    clips, contexts = _padded_batch()
    stock_texts, stock_ids = _generate(_load(long_checkpoint, torch.bfloat16, fast=False), clips, contexts)
    _without_onednn_packing(monkeypatch)
    with caplog.at_level(logging.INFO, logger="qwen_asr_worker"):
        model = _load(long_checkpoint, torch.bfloat16, fast=True)
    assert not [r for r in caplog.records if "fast CPU decode unavailable" in r.getMessage()]
    assert any("bf16 blocked" in r.getMessage() and "one-step decoder layers" in r.getMessage() for r in caplog.records)
    linears = [m for m in model.model.thinker.modules() if isinstance(m, decode_linears.Bf16Linear)]
    assert linears and isinstance(model.model.thinker.lm_head, decode_linears.Bf16Linear)
    assert all(m.weight_bf16.dtype == torch.bfloat16 for m in linears)
    # Every shape the blocked layout takes runs on the kernel (the tiny vocabulary's output projection does not).
    fitting = [m for m in linears if cpu_kernels.Kernels.fits(m.out_features, m.in_features)]
    assert len(fitting) >= 4 and all(m.kernel is not None for m in fitting)
    assert not any(isinstance(m, decode_linears.PackedLinear) for m in model.model.modules())
    texts, ids = _generate(model, clips, contexts)
    assert texts == stock_texts == [LONG, LONG]
    assert torch.equal(ids, stock_ids)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_each_cpu_gets_the_linears_it_can_run_and_says_why(
    long_checkpoint: Path, dtype: torch.dtype, caplog: pytest.LogCaptureFixture
) -> None:
    """oneDNN's packed linears where it packs `dtype`; for bf16 where it does not (no AVX-512, no AVX-NE-CONVERT:
    the `make test` pass with oneDNN capped at AVX2 takes this branch), our blocked bf16 kernel; where neither runs,
    the stock path with one warning naming oneDNN's reason. Each CPU asserts its own branch, and transcribes."""
    onednn = fast_decode._packed_problem(dtype, "none")
    with caplog.at_level(logging.INFO, logger="qwen_asr_worker"):
        model = _load(long_checkpoint, dtype, fast=True)
    warnings = [r.getMessage() for r in caplog.records if "fast CPU decode unavailable" in r.getMessage()]
    kinds = {type(m) for m in model.model.modules()} & set(FAST_LINEARS)
    if not onednn:
        assert kinds == {decode_linears.PackedLinear} and not warnings
    elif not packing_problem(dtype):
        assert dtype == torch.bfloat16 and kinds == {decode_linears.Bf16Linear} and not warnings
    else:
        assert not kinds and len(warnings) == 1 and onednn in warnings[0]
    assert _generate(model, [speech_like(2.0, seed=4)], [""])[0] == [LONG]


def test_other_devices_keep_the_stock_path_but_trim_prefill_logits() -> None:
    model = _TinyThinkerHolder()
    note = fast_decode.accelerate_decoder(model, device="cuda", dtype=torch.bfloat16)
    assert note.startswith("stock decode (not a CPU)")
    assert isinstance(model.thinker.lm_head, nn.Linear)
    hidden = torch.randn(2, 5, 8)
    assert model.thinker.lm_head(hidden).shape == (2, 1, 3)  # only the last position's logits
    assert model.thinker.lm_head(hidden[:, :1]).shape == (2, 1, 3)


class _TinyThinkerHolder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.thinker = nn.Module()
        self.thinker.lm_head = nn.Linear(8, 3, bias=False)


def test_int8_is_refused_off_the_cpu(long_checkpoint: Path) -> None:
    with pytest.raises(InvalidRequest, match=r"quantization:int8 is for decoding on a CPU.*device:cpu"):
        models.load_asr(
            str(long_checkpoint),
            device="cuda",
            dtype=torch.bfloat16,
            attn_implementation="sdpa",
            max_inference_batch_size=1,
            max_new_tokens=8,
            quantization="int8",
        )


def test_growing_cache_returns_what_concatenation_returns() -> None:
    from transformers.cache_utils import DynamicLayer

    growing, plain = decode_step.growing_layer_class()(), DynamicLayer()
    torch.manual_seed(0)
    for new in (300, 1, 1, 255, 1, 400, 1):  # crosses the first capacity (300 + 300) and a later one
        key, value = torch.randn(2, 3, new, 4), torch.randn(2, 3, new, 4)
        got, expected = growing.update(key, value), plain.update(key, value)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert growing.get_seq_length() == plain.get_seq_length() == 959
    growing.crop(100)
    plain.crop(100)
    key, value = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
    assert torch.equal(growing.update(key, value)[0], plain.update(key, value)[0])
    beams = torch.tensor([1, 0])
    growing.reorder_cache(beams)
    plain.reorder_cache(beams)
    key, value = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
    assert torch.equal(growing.update(key, value)[1], plain.update(key, value)[1])


def test_a_crop_keeps_the_buffer_and_its_spare_room() -> None:
    """Cropping shortens the cache in place: the same buffer, its spare capacity kept, so the next position is
    written without another copy, and the values are still concatenation's."""
    from transformers.cache_utils import DynamicLayer

    growing, plain = decode_step.growing_layer_class()(8), DynamicLayer()
    growing.crop(5)  # before anything was stored: nothing to crop, nothing held
    assert growing.get_seq_length() == 0 and growing.held_bytes() == 0
    torch.manual_seed(0)
    key, value = torch.randn(1, 2, 20, 4), torch.randn(1, 2, 20, 4)
    growing.update(key, value)
    plain.update(key, value)
    buffer = growing.keys.data_ptr()  # the keys are a view of the buffer's first positions
    for length in (25, 12, 12):  # past the end (nothing to crop), then shorter, then the same
        growing.crop(length)
        plain.crop(length)
        assert growing.get_seq_length() == plain.get_seq_length()
        key, value = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4)
        got, expected = growing.update(key, value), plain.update(key, value)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert growing.keys.data_ptr() == buffer  # no copy: the room was kept
        # Keys and values, as first allocated: 2 heads x (20 + 8 spare) positions x 4 wide, float32.
        assert growing.held_bytes() == 2 * (2 * 28 * 4) * 4
    growing.crop(0)
    plain.crop(0)
    key, value = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    assert torch.equal(growing.update(key, value)[0], plain.update(key, value)[0])


def test_growing_cache_keeps_the_model_dtype_and_the_values() -> None:
    from transformers.cache_utils import DynamicLayer

    growing, plain = decode_step.growing_layer_class()(4), DynamicLayer()
    for new in (10, 1, 1, 9):  # the prompt plus the spare 4, then a growth
        key, value = torch.randn(1, 2, new, 8).bfloat16(), torch.randn(1, 2, new, 8).bfloat16()
        got, expected = growing.update(key, value), plain.update(key, value)
        assert got[0].dtype == got[1].dtype == torch.bfloat16
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.fixture(scope="module")
def grouped_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like `long_checkpoint`, with 8 query heads sharing 4 key/value heads (the tiny one has 2 and 1)."""
    dims = dataclasses.replace(TINY_ASR, heads=8, kv_heads=4)
    return build_asr_checkpoint(tmp_path_factory.mktemp("grouped") / "asr", sentence=LONG, dims=dims)


@pytest.mark.parametrize("ops", ["C", "torch"])
@pytest.mark.parametrize("heads", ["2 on 1", "8 on 4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_step_decoder_layers_give_the_module_by_module_logits_on_random_weights(
    request: pytest.FixtureRequest, heads: str, dtype: torch.dtype, ops: str
) -> None:
    """The scripted checkpoint's layers add zero to the residual stream, so greedy tokens alone would not see a
    wrong layer: here every decoder layer gets random weights first. With torch's operators between the products
    the one-step layer gives the module-by-module logits to the bit; with our compiled ones (float32 sums in
    their own order), within rounding."""
    import copy

    if ops == "C" and cpu_kernels.load()[0] is None:
        pytest.skip(f"no compiled kernels here: {cpu_kernels.load()[1]}")
    _needs_packing(dtype)

    long_checkpoint = request.getfixturevalue("long_checkpoint" if heads == "2 on 1" else "grouped_checkpoint")
    stock = _load(long_checkpoint, dtype, fast=False, tokens=40)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in stock.model.thinker.model.layers.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.05 * torch.randn_like(param))
    fused, unfused = copy.deepcopy(stock), copy.deepcopy(stock)
    for model in (fused, unfused):
        note = fast_decode.accelerate_decoder(model.model, device="cpu", dtype=dtype)
        assert "one-step decoder layers" in note
    for layer in unfused.model.thinker.model.layers:
        assert isinstance(layer.forward, decode_step.DecodeLayer)
        del layer.forward  # back to the class's forward: the stacked products called module by module
    handed_on: list[int] = []  # the query lengths the one-step layers passed to the stock forward

    def recording(stock: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            handed_on.append(hidden.shape[1])
            return stock(hidden, *args, **kwargs)

        return forward

    compiled: list[bool] = []  # per one-token step and layer: did the compiled operators run it?

    def counted(run: Callable[..., torch.Tensor | None], into: list[bool]) -> Callable[..., torch.Tensor | None]:
        def step(*args: Any) -> torch.Tensor | None:
            out = run(*args)
            into.append(out is not None)
            return out

        return step

    for layer in fused.model.thinker.model.layers:
        step = layer.forward
        step.stock = recording(step.stock)
        if ops == "torch":
            step.kernels = None
        else:
            assert step.kernels is not None
            step._with_kernels = counted(step._with_kernels, compiled)
    clips, contexts = _padded_batch()
    texts, logits = _generate(fused, clips, contexts, logits=True)
    module_texts, module_logits = _generate(unfused, clips, contexts, logits=True)
    stock_texts, stock_logits = _generate(stock, clips, contexts, logits=True)
    assert logits.shape[0] >= 20 and logits.shape[1] == 2
    # Only the prompts went to the stock forward: every one-token step ran the one-step layer.
    assert handed_on and 1 not in handed_on
    unit = 0.02 if dtype == torch.bfloat16 else 1e-5  # rounding, relative to the largest logit
    if ops == "torch":
        assert texts == module_texts and torch.equal(logits, module_logits)  # the same operators, same values
    else:
        assert compiled and all(compiled)
        _assert_same_until_a_near_tie(logits, module_logits, unit * module_logits.abs().max().item())
    # Against transformers' own layers (unpacked weights, its cache and attention): the same tokens and logits
    # within rounding, while the random layers moved the logits far more than that from the scripted model's.
    _, scripted_logits = _generate(_load(long_checkpoint, dtype, fast=False, tokens=40), clips, contexts, logits=True)
    tolerance = unit * stock_logits.abs().max().item()
    # oneDNN's packed products are F.linear's to the bit; our blocked bf16 kernel's (where oneDNN packs no bf16)
    # sum in their own order, so against transformers' layers they too agree only until a near tie.
    exact_linears = not any(isinstance(m, decode_linears.Bf16Linear) for m in fused.model.modules())
    if ops == "torch" and exact_linears:
        assert texts == stock_texts
        assert (logits - stock_logits).abs().max().item() <= tolerance
    else:
        _assert_same_until_a_near_tie(logits, stock_logits, tolerance)
    assert (stock_logits - scripted_logits).abs().max().item() > 10 * tolerance


def _assert_same_until_a_near_tie(logits: torch.Tensor, reference: torch.Tensor, tolerance: float) -> None:
    """Greedy decoding on random weights meets near ties, where rounding alone may pick the other token: the
    logits (steps, batch, vocab) must agree within `tolerance` up to and including the first step whose choice
    differs, and there the reference's two best logits must be within rounding of each other."""
    steps = min(logits.shape[0], reference.shape[0])
    for row in range(logits.shape[1]):
        ours, theirs = logits[:steps, row], reference[:steps, row]
        differs = (ours.argmax(-1) != theirs.argmax(-1)).nonzero()
        last = int(differs[0]) if len(differs) else steps - 1
        assert last >= 10, "the choices parted within the first ten steps"
        assert (ours[: last + 1] - theirs[: last + 1]).abs().max().item() <= tolerance
        if len(differs):
            best, second = theirs[last].topk(2).values.tolist()
            assert best - second <= 2 * tolerance, "the choices parted where the reference had a clear winner"


@pytest.mark.parametrize("masked", [False, True])
def test_single_query_attention_matches_sdpa(masked: bool) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = nn.Module()
    module.num_key_value_groups = 4
    module.is_causal = True
    torch.manual_seed(1)
    query, key, value = torch.randn(2, 8, 1, 16), torch.randn(2, 2, 30, 16), torch.randn(2, 2, 30, 16)
    mask = None
    if masked:
        mask = torch.ones(2, 1, 1, 30, dtype=torch.bool)
        mask[0, :, :, :7] = False  # left padding in the first sequence
    got, _ = decode_step.decode_attention(module, query, key, value, mask, scaling=0.25)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert got.shape == expected.shape == (2, 1, 8, 16)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_status_counts_packed_weights(harness: Harness, checkpoints: dict[str, Path], audio: dict) -> None:
    # bf16 as set, not auto: where oneDNN packs no bf16, auto with the fast path computes in float32 on bf16 weights
    sizes = {}
    for fast in ("off", "on"):
        assert harness.load(checkpoints["asr"], f"fast_decode:{fast}", "torch_dtype:bf16").success
        assert harness.transcribe(audio["wav"]).text == SENTENCE
        sizes[fast] = harness.status().memory.breakdown["base_model_weights"]
    assert sizes["on"] == sizes["off"] > 0


# --- bf16 weights, float32 compute (torch_dtype:auto where oneDNN packs no bf16) -------------------------------------

needs_bf16_kernel = pytest.mark.skipif(
    fast_decode.bf16_kernel() is None, reason=f"our bf16 kernel does not build here: {cpu_kernels.load()[1]}"
)


@needs_bf16_kernel
@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_bf16_weights_with_float32_compute_say_the_same(long_checkpoint: Path, quantization: str) -> None:
    """Every linear weight stays bf16 (blocked; int8 in the decoder with quantization:int8), the embedding table
    bf16, everything else float32: the stock path's greedy tokens, in bf16 and in float32."""
    clips, contexts = _padded_batch()
    model = _load(long_checkpoint, torch.float32, fast=True, quantization=quantization, bf16_weights=True)
    thinker = model.model.thinker
    assert model.model.dtype == torch.float32
    decoder_kind = decode_linears.Int8Linear if quantization == "int8" else decode_linears.Bf16Linear
    assert any(isinstance(m, decoder_kind) for m in thinker.model.modules())
    encoder = [m for m in thinker.audio_tower.modules() if isinstance(m, decode_linears.Bf16Linear)]
    assert encoder and all(m.weight_bf16.dtype == torch.bfloat16 for m in encoder)
    assert not any(isinstance(m, nn.Linear) for m in [*thinker.audio_tower.modules(), *thinker.model.modules()])
    assert thinker.model.embed_tokens.weight.dtype == torch.bfloat16
    floating = [t for t in [*thinker.parameters(), *thinker.buffers()] if t.is_floating_point()]
    assert {t.dtype for t in floating if t is not thinker.model.embed_tokens.weight} == {torch.float32}
    texts, ids = _generate(model, clips, contexts)
    for stock_dtype in (torch.bfloat16, torch.float32):
        stock_texts, stock_ids = _generate(_load(long_checkpoint, stock_dtype, fast=False), clips, contexts)
        assert texts == stock_texts == [LONG, LONG]
        assert torch.equal(ids, stock_ids)


@needs_bf16_kernel
def test_auto_takes_bf16_weights_where_they_pay(
    harness: Harness,
    checkpoints: dict[str, Path],
    audio: dict,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Where `bf16_weights_pay()` (a CPU without fast bf16, here said so on any CPU) `torch_dtype:auto` computes in
    float32 on bf16 weights and says so; `torch_dtype:fp32` stays plain float32; Status counts bf16 bytes."""
    monkeypatch.setattr(fast_decode, "bf16_weights_pay", lambda: True)
    sizes = {}
    for dtype in ("auto", "fp32"):
        with caplog.at_level(logging.INFO, logger="qwen_asr_worker"):
            assert harness.load(checkpoints["asr"], f"torch_dtype:{dtype}").success
        assert harness.transcribe(audio["wav"]).text == SENTENCE
        model = harness.engine.current
        assert model is not None and model.dtype == torch.float32
        assert model.asr is not None
        encoder = model.asr.model.thinker.audio_tower
        sizes[dtype] = harness.status().memory.breakdown["base_model_weights"]
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded Qwen3-ASR")]
        assert ("as float32 on bf16 weights" in lines[-1]) is (dtype == "auto")
        assert any(isinstance(m, decode_linears.Bf16Linear) for m in encoder.modules()) is (dtype == "auto")
    assert 0 < sizes["auto"] < 0.75 * sizes["fp32"]
