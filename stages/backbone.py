"""`dret backbone`: resolve features.backbone once (scratch: create it) and record it."""
from __future__ import annotations

from pathlib import Path

import typer

from stages.common import ParamsOption, guard, load


def main(params: ParamsOption = Path("params.yaml")) -> None:
    """Resolve the CLIP backbone and write backbone.json under paths.backbone.

    features.backbone: `scratch` creates a small random-init CLIP (sized by features.scratch,
    seeded by `seed`) with a BPE tokenizer trained on the training captions, saved as a standard
    Hugging Face directory; a Hub id or a local directory is resolved and fingerprinted as is.
    """
    with guard():
        p = load(params)
        from pipeline import dist, tracking
        from pipeline.features.backbone import RECORD_FILE, run_backbone

        with tracking.stage_run(p, "backbone", is_main=dist.env().is_main) as tracker:
            record = run_backbone(p)
            tracker.set_tags({"backbone_fingerprint": record["fingerprint"],
                              "backbone_source": record["source"]})
            tracker.log_artifact(Path(p.paths.backbone) / RECORD_FILE)
        typer.echo(f"backbone {record['name']} ({record['source']}, revision {record['revision']})"
                   f" at {record['path']}, fingerprint {record['fingerprint'][:12]}")
