from __future__ import annotations

from pathlib import Path

import pytest

from cachefit.core.hardware import get_device, load_devices


def test_catalog_has_the_shared_devices_with_sources() -> None:
    catalog = load_devices()
    assert {"a100", "h100", "h200", "b200", "l40s", "mi300x", "groq-lpu", "cerebras-wse3", "ipu-gc200",
            "sn40l", "wormhole-n150", "dmatrix-corsair"} <= set(catalog)
    for device in catalog.values():
        for figure in device.figures.values():
            assert figure.kind in {"V", "M", "3P", "A"} and len(figure.source) > 5


def test_h100_capacity_is_the_assumed_usable_share_of_l2() -> None:
    h100 = load_devices()["h100"]
    assert h100.on_chip_bytes == 50 * 2**20
    assert h100.capacity_bytes == int(50 * 2**20 * 0.75) == 39_321_600


def test_user_file_overrides_a_figure_and_adds_a_device(tmp_path: Path) -> None:
    mine = tmp_path / "mine.toml"
    mine.write_text('[h100]\nusable_fraction = 0.5\n\n[my-chip]\nlabel = "My chip"\n'
                    'on_chip_bytes = { value = 1e6, kind = "V", source = "our datasheet" }\n')
    catalog = load_devices(mine)
    assert catalog["h100"].capacity_bytes == 50 * 2**19
    assert catalog["h100"].figures["usable_fraction"].kind == "user"
    assert catalog["h100"].figures["on_chip_bandwidth"].value == 7.0e12      # other figures kept
    assert catalog["my-chip"].capacity_bytes == 1_000_000


@pytest.mark.parametrize(("text", "message"), [
    ("[x]\nlabel = 'x'\n", r"\[x\]: on_chip_bytes is required"),
    ("[h100]\nusable_fraction = 1.5\n", "usable_fraction must be in"),
    ("[h100]\non_chip_bytes = -1\n", "on_chip_bytes.value"),
    ("not toml = = 1", "not valid TOML"),
])
def test_bad_user_files(tmp_path: Path, text: str, message: str) -> None:
    mine = tmp_path / "mine.toml"
    mine.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_devices(mine)


def test_unknown_device_lists_the_known() -> None:
    with pytest.raises(ValueError, match="device 'h1000' is not in the catalog; known: a100"):
        get_device("h1000", load_devices())
