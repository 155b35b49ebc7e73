"""The export format's tensor coding and helpers against by-hand references (seeded random tensors)."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from recsys.serving.format import (
    CORE_DTYPES,
    MANIFEST_DIGEST_FILE,
    MANIFEST_FILE,
    SCALE_SUFFIX,
    ExportFormatError,
    dequantize,
    finite_or_none,
    quantize,
    read_manifest,
    sha256_bytes,
)


def _core(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(7, 3, 10, generator=g, dtype=torch.float64) * torch.linspace(0.01, 3.0, 7)[:, None, None].double()
    )


def test_fp32_and_fp16_store_the_tensor_cast_and_nothing_else():
    core = _core(1)
    fp32 = quantize(core, "fp32")
    assert set(fp32) == {""} and fp32[""].dtype == torch.float32
    assert torch.equal(fp32[""], core.float())
    fp16 = quantize(core, "fp16")
    assert set(fp16) == {""} and fp16[""].dtype == torch.float16
    assert torch.equal(fp16[""], core.half())
    assert torch.equal(dequantize(fp16[""], None), core.half().float())
    assert dequantize(fp32[""], None).dtype == torch.float32


def test_int8_is_symmetric_with_one_scale_per_core_row_by_hand():
    core = _core(2)
    stored = quantize(core, "int8")
    assert set(stored) == {"", SCALE_SUFFIX}
    rows = core.float().reshape(7, -1)
    scale = rows.abs().amax(dim=1) / 127.0  # by hand: the largest |value| of a row maps to +-127
    torch.testing.assert_close(stored[SCALE_SUFFIX], scale, rtol=0, atol=0)
    assert stored[""].dtype == torch.int8 and stored[""].shape == core.shape
    expected = torch.round(rows / scale[:, None]).reshape(core.shape)
    assert torch.equal(stored[""].to(torch.float32), expected)
    assert int(stored[""].abs().amax()) == 127  # every row reaches the end of the range
    restored = dequantize(stored[""], stored[SCALE_SUFFIX])
    error = (restored - core.float()).abs().reshape(7, -1).amax(dim=1)
    assert bool((error <= scale / 2 + 1e-7).all())  # rounding: at most half a step


def test_int8_of_an_all_zero_row_stays_zero_and_unknown_dtypes_are_refused():
    core = _core(3)
    core[4] = 0.0
    stored = quantize(core, "int8")
    assert torch.equal(dequantize(stored[""], stored[SCALE_SUFFIX])[4], torch.zeros(3, 10))
    with pytest.raises(ValueError, match="core dtype must be one of"):
        quantize(core, "bf16")
    with pytest.raises(ExportFormatError, match="without its scales"):
        dequantize(stored[""], None)
    assert CORE_DTYPES == ("fp32", "fp16", "int8")


def test_sha256_and_json_safe_metrics():
    data = bytes(range(256)) * 3
    assert sha256_bytes(data) == hashlib.sha256(data).hexdigest()
    assert finite_or_none(math.nan) is None and finite_or_none(math.inf) is None
    assert finite_or_none(0.75) == 0.75 and finite_or_none(3) == 3 and finite_or_none("x") == "x"


@pytest.mark.parametrize("content", [{"format": "other-format", "format_version": 2}, ["not", "a", "mapping"]])
def test_a_signed_manifest_of_another_format_is_refused(tmp_path, content):
    """The sha256 matches (the file is intact) but it is not our manifest: refused as such, not half-read."""
    text = json.dumps(content).encode()
    (tmp_path / MANIFEST_FILE).write_bytes(text)
    (tmp_path / MANIFEST_DIGEST_FILE).write_text(sha256_bytes(text) + "\n")
    with pytest.raises(ExportFormatError, match=r"not a .* manifest"):
        read_manifest(tmp_path)


def _leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_write_export_creates_parents_replaces_atomically_and_leaves_nothing_behind(tmp_path):
    """A nested new target is created; a second write replaces it; stale temporary and old directories of a
    crashed earlier write (same process id) are cleared; a failed write leaves the previous export and no
    temporary directory."""
    import os

    from recsys.serving.format import write_export

    target = tmp_path / "a" / "b" / "export"
    tensors = {"t.safetensors": {"x": torch.arange(4.0)}}
    write_export(target, tensors, {"format": "f", "version": "1"})
    assert json.loads((target / MANIFEST_FILE).read_text())["version"] == "1"
    for stale in (f".export.old-{os.getpid()}", f".export.tmp-{os.getpid()}"):  # a crash left them
        (target.parent / stale).mkdir()
        (target.parent / stale / "junk").write_text("x")
    write_export(target, tensors, {"format": "f", "version": "2"})
    assert json.loads((target / MANIFEST_FILE).read_text())["version"] == "2"
    assert _leftovers(target.parent) == []
    write_export(target, tensors, {"format": "f", "version": "2"})  # and a plain replace, nothing stale
    assert _leftovers(target.parent) == []
    with pytest.raises(AttributeError):  # not a tensor: fails while writing the files
        write_export(target, {"t.safetensors": {"x": "not a tensor"}}, {"format": "f", "version": "3"})
    assert json.loads((target / MANIFEST_FILE).read_text())["version"] == "2" and _leftovers(target.parent) == []
