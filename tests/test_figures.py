"""tools/make_figures.py: the documentation's pictures (docs/images/) are what the script draws today: byte for byte
with the matplotlib that drew them (the script fixes every source of variation: no date or version in the metadata, a
fixed id salt, text kept as text); with another matplotlib, which may place the same picture in other bytes, every
label of each picture is the committed one's, in order."""

import re
from pathlib import Path

import matplotlib

from tools import make_figures

IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"


def labels(svg: bytes) -> list[str]:
    return re.findall(r"<text[^>]*>([^<]*)</text>", svg.decode())


def test_make_figures_writes_the_committed_images(tmp_path, capsys):
    make_figures.main(str(tmp_path))
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(make_figures.FIGURES) == sorted(p.name for p in IMAGES.glob("*.svg"))
    same_matplotlib = matplotlib.__version__ == make_figures.DRAWN_WITH
    for name in written:
        new, committed = (tmp_path / name).read_bytes(), (IMAGES / name).read_bytes()
        assert len(new) < 60_000, f"{name}: {len(new):,} bytes"
        assert len(labels(committed)) > 10 and labels(new) == labels(committed), name
        if same_matplotlib:
            assert new == committed, f"docs/images/{name} differs from what tools/make_figures.py draws"
    assert capsys.readouterr().out.count("wrote ") == len(written)
