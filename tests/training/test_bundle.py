"""A bundle is verified before use: every fault is refused with a message that names it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from router.core.bundle import load_bundle
from router.core.embedder import file_sha256
from router.core.engine import open_engine
from router.core.errors import BundleError
from router.core.manifest import Manifest
from tests.helpers import edit_manifest


@pytest.fixture
def bundle_copy(small_bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(small_bundle, target)
    return target


def test_a_good_bundle_loads_and_describes_itself(small_bundle: Path) -> None:
    bundle, engine = open_engine(small_bundle, provider="cpu")
    m = bundle.manifest
    assert m.format_version == 2
    assert len(m.models) == 29 and bundle.heads.n_models == 29
    assert m.embedder.dim == 384 and m.embedder.precision == "int8"
    assert set(m.files) == {
        "embedder/embedder.onnx",
        "embedder/tokenizer.json",
        "heads.onnx",
        "reference/outcomes.json",
        "reference/calibration.json",
    }
    assert m.reference is not None and m.changes == []
    assert all(spec.price_source and spec.origin == "trained" for spec in m.models)
    assert m.policy.c_ref_usd > 0 and 0 <= m.policy.default_cost_weight <= 1
    assert m.policy.default_preset == "cost-30"
    assert m.policy.presets["cost-30"].cost_weight == m.policy.default_cost_weight
    assert len(m.training.data_fingerprint) == 64
    assert 0 < m.training.validation_metrics.aiq_zero < m.training.validation_metrics.aiq_oracle
    est = engine.estimate(["What is 2 + 2?", "Explain the Krebs cycle."])
    assert est.quality.shape == (2, 29) and (est.cost_usd > 0).all()


def test_the_manifest_reads_back_as_it_was_written(small_bundle: Path, tmp_path: Path) -> None:
    manifest = Manifest.read(small_bundle)
    manifest.write(tmp_path)
    assert Manifest.read(tmp_path) == manifest
    assert (tmp_path / "manifest.json").read_text() == (small_bundle / "manifest.json").read_text()


def test_a_manifest_edited_without_its_checksum_is_refused(bundle_copy: Path) -> None:
    edit_manifest(bundle_copy, lambda m: m["policy"].update({"default_cost_weight": 0.9}), reseal=False)
    with pytest.raises(BundleError, match="manifest_sha256 does not match"):
        load_bundle(bundle_copy)


def test_flipped_byte_in_an_onnx_file_is_refused(bundle_copy: Path) -> None:
    heads = bundle_copy / "heads.onnx"
    data = bytearray(heads.read_bytes())
    data[len(data) // 2] ^= 0xFF
    heads.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"heads\.onnx.*sha256 mismatch"):
        load_bundle(bundle_copy)


def test_corrupt_onnx_with_a_matching_checksum_is_refused(bundle_copy: Path) -> None:
    heads = bundle_copy / "heads.onnx"
    heads.write_bytes(b"not an onnx graph")
    edit_manifest(bundle_copy, lambda m: m["files"].update({"heads.onnx": file_sha256(heads)}))
    with pytest.raises(BundleError, match=r"heads\.onnx: not a loadable ONNX model"):
        load_bundle(bundle_copy)


def test_missing_file_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "embedder" / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json' is listed in the manifest but missing"):
        load_bundle(bundle_copy)


def test_a_model_the_heads_do_not_have_is_refused(bundle_copy: Path) -> None:
    extra = {
        "name": "gpt-imaginary",
        "input_usd_per_mtok": 1.0,
        "output_usd_per_mtok": 2.0,
        "output_tokens_known": True,
    }
    edit_manifest(bundle_copy, lambda m: m["models"].append(extra))
    with pytest.raises(BundleError, match="heads predict 29 models, the manifest lists 30"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("escape", ["../outside.onnx", "/etc/passwd.json", "embedder/../../x.json"])
def test_paths_escaping_the_bundle_are_refused(bundle_copy: Path, escape: str) -> None:
    edit_manifest(bundle_copy, lambda m: m["files"].update({escape: "0" * 64}))
    with pytest.raises(BundleError, match="escapes the bundle directory"):
        load_bundle(bundle_copy)


def test_symlink_escaping_the_bundle_is_refused(bundle_copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    (bundle_copy / "link.json").symlink_to(outside)
    edit_manifest(bundle_copy, lambda m: m["files"].update({"link.json": file_sha256(outside)}))
    with pytest.raises(BundleError, match="escapes the bundle directory"):
        load_bundle(bundle_copy)


def test_only_onnx_and_json_files_are_accepted(bundle_copy: Path) -> None:
    (bundle_copy / "heads.pkl").write_bytes(b"\x80\x04")
    edit_manifest(
        bundle_copy, lambda m: m["files"].update({"heads.pkl": file_sha256(bundle_copy / "heads.pkl")})
    )
    with pytest.raises(BundleError, match="only ONNX and JSON"):
        load_bundle(bundle_copy)


def test_unknown_format_version_and_broken_manifest_are_refused(bundle_copy: Path) -> None:
    edit_manifest(bundle_copy, lambda m: m.update({"format_version": 99}))
    with pytest.raises(BundleError, match=r"format_version 99 is not supported.*retrain"):
        load_bundle(bundle_copy)
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not readable JSON"):
        load_bundle(bundle_copy)


def test_manifest_field_errors_name_the_field(bundle_copy: Path) -> None:
    edit_manifest(bundle_copy, lambda m: m["policy"].update({"c_ref_usd": -1}))
    with pytest.raises(BundleError, match=r"invalid manifest at policy\.c_ref_usd"):
        load_bundle(bundle_copy)
