"""One typed settings path: the environment read once and parsed one way, unknown names refused, changes undone."""

import pytest

from model import kernels, settings


def test_environment_overrides_parse_one_way(monkeypatch):
    for raw, value in [("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("False", False)]:
        monkeypatch.setenv("FALCON_ALIGN_FUSED_PROJECTIONS", raw)
        assert settings._from_environment(settings.Settings()).fused_projections is value, raw
    monkeypatch.setenv("FALCON_ALIGN_MIXER_STREAMS", "auto")
    monkeypatch.setenv("FALCON_ALIGN_KERNELS", "reference")
    monkeypatch.setenv("FALCON_ALIGN_COMPILE_BACKEND", "aot_eager")
    read = settings._from_environment(settings.Settings())
    assert (read.mixer_streams, read.kernels, read.compile_backend) == (None, "reference", "aot_eager")
    monkeypatch.setenv("FALCON_ALIGN_SSD_RECOMPUTE", "maybe")
    with pytest.raises(ValueError, match="FALCON_ALIGN_SSD_RECOMPUTE='maybe'"):
        settings._from_environment(settings.Settings())
    monkeypatch.setenv("FALCON_ALIGN_SSD_RECOMPUTE", "0")
    monkeypatch.setenv("FALCON_ALIGN_KERNELS", "ref")
    with pytest.raises(ValueError, match="FALCON_ALIGN_KERNELS.*'auto', 'triton', 'mamba-ssm', 'reference', got 'ref'"):
        settings._from_environment(settings.Settings())
    for provider in ("auto", "triton", "mamba-ssm", "reference"):
        monkeypatch.setenv("FALCON_ALIGN_KERNELS", provider)
        assert settings._from_environment(settings.Settings()).kernels == provider


@pytest.mark.parametrize("wrong", ["mamba_ssm", "Triton", "ours", "", None])
def test_kernel_provider_names_are_checked(wrong):
    with pytest.raises(
        ValueError, match=f"kernels must be one of 'auto', 'triton', 'mamba-ssm', 'reference', got {wrong!r}"
    ):
        settings.Settings(kernels=wrong)
    with pytest.raises(ValueError, match="kernels must be one of"):
        settings.configure(kernels=wrong)
    assert settings.settings().kernels in settings.KERNEL_PROVIDERS  # a refused change leaves the settings as they were


def test_configure_refuses_unknown_names_and_overridden_restores():
    before = settings.settings()
    with pytest.raises(ValueError, match="unknown setting"):
        settings.configure(fuse_projections=False)
    with settings.overridden(kernels="reference", compile_loss=False) as now:
        assert (now.kernels, now.compile_loss) == ("reference", False)
        assert settings.settings() is now
        assert kernels.get_ops("cpu") is kernels.REFERENCE
    assert settings.settings() == before
    for provider in settings.KERNEL_PROVIDERS:  # the CPU runs the reference whoever supplies the fast ops
        with settings.overridden(kernels=provider):
            assert kernels.get_ops("cpu") is kernels.REFERENCE


def test_no_environment_read_outside_the_settings_module():
    """Features are switched through model.settings; FALCON_ALIGN_ variables are read there alone."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    readers = [
        str(p.relative_to(root))
        for folder in ("model", "align", "demo", "bench")
        for p in (root / folder).rglob("*.py")
        if "FALCON_ALIGN_" in p.read_text() and p.name != "settings.py"
    ]
    assert readers == []
