"""The built-in synthetic benchmark: generated clips under `paths.prepared/videos`.

The generator (`pipeline.data.synthetic.generate`) writes the clips and returns the tables with
their attribute columns, OOD captions and its own statistics; its val split is its own, so
prepare carves nothing.
"""
from __future__ import annotations

from pipeline.data.adapters import Source
from pipeline.data.tables import RawDataset


def load(src: Source) -> RawDataset:
    """Generate (or reuse) the synthetic clips in `src.video_root` and return their tables."""
    from pipeline.data.synthetic import generate

    return generate(src.prepare.synthetic, src.video_root, src.seed)
