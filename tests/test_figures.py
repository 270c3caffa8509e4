"""tools/make_figures.py: the documentation's pictures (docs/images/) are what the script draws today, byte for byte
(it fixes every source of variation: no date or version in the metadata, a fixed id salt, text kept as text)."""

from pathlib import Path

import matplotlib

from tools import make_figures

IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"


def test_make_figures_writes_the_committed_images_byte_for_byte(tmp_path, capsys):
    make_figures.main(str(tmp_path))
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(make_figures.FIGURES) == sorted(p.name for p in IMAGES.glob("*.svg"))
    for name in written:
        new, committed = (tmp_path / name).read_bytes(), (IMAGES / name).read_bytes()
        assert len(new) < 60_000, f"{name}: {len(new):,} bytes"
        assert new == committed, (f"docs/images/{name} is not what tools/make_figures.py draws now (matplotlib "
                                  f"{matplotlib.__version__}): run it and commit the result")  # fmt: skip
    assert capsys.readouterr().out.count("wrote ") == len(written)
