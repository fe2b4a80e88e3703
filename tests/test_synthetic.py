"""The synthetic demo benchmark: content model, captions, splits, hard negatives, rendering."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import SyntheticConfig
from pipeline.data import render as R
from pipeline.data import synthetic as S
from pipeline.errors import PipelineError

TINY = SyntheticConfig(n_train=12, n_val=4, n_test=24, n_ood=12, workers=1)
RENDER = SyntheticConfig(n_train=4, n_val=2, n_test=6, n_ood=4, workers=2)  # a dozen clips


def content_of(row: pd.Series) -> S.Content:
    """The attribute tuple of a videos-table row."""
    objs = zip(row.shapes.split("|"), row.colours.split("|"), strict=True)
    return S.make_content(objs, row.background, row.motion, row.speed)


def known_words() -> set[str]:
    """Every word the caption generator can emit for rendered clips."""
    phrases: list[str] = [*S.TEMPLATES, *S.BACKGROUND_NOUNS, "a an and both"]
    for table in (S.SHAPE_WORDS, S.COLOUR_WORDS, S.BACKGROUND_WORDS, S.SPEED_WORDS, S.COUNT_WORDS):
        phrases += [w for words in table.values() for w in words]
    phrases += [w for forms in S.MOTION_WORDS.values() for pair in forms for w in pair]
    return set(re.findall(r"[a-z-]+", " ".join(phrases).replace("{", " ").replace("}", " ")))


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z-]+", text.lower()))


@pytest.fixture(scope="module")
def plan() -> S.Plan:
    return S.plan_benchmark(TINY, seed=3)


@pytest.fixture(scope="module")
def tables(plan: S.Plan) -> tuple[pd.DataFrame, pd.DataFrame]:
    return S.videos_table(plan), S.captions_table(plan)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory):
    return S.generate(RENDER, tmp_path_factory.mktemp("syn"), seed=1, progress=False)


# ------------------------------------------------------------------------------------------------
# Content model and captions (no rendering)
# ------------------------------------------------------------------------------------------------


def test_tables_follow_the_contract(tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    videos, captions = tables
    assert list(videos.columns) == ["video_id", "path", "split", "shapes", "colours", "background",
                                    "motion", "speed", "n_objects", "seen_combo", "twin_of"]
    assert list(captions.columns) == ["caption_id", "video_id", "text", "split", "reversed_text"]
    assert videos.n_objects.dtype == np.int64 and videos.seen_combo.dtype == bool
    assert videos.video_id.is_unique and captions.caption_id.is_unique
    assert (videos.path == videos.video_id + ".mp4").all()
    assert videos.split.value_counts().to_dict() == {"train": 12, "test": 24, "val": 4}
    per_video = captions.groupby("video_id").size()
    split = videos.set_index("video_id").split
    assert (per_video[split[split == "train"].index] == TINY.captions_per_clip).all()
    assert (per_video[split[split != "train"].index] == 1).all()  # one query per val/test clip
    assert (captions.split == split[captions.video_id].to_numpy()).all()


def test_same_seed_same_tables_other_seed_differs() -> None:
    a, b, c = (S.plan_benchmark(TINY, seed) for seed in (5, 5, 6))
    for table in (S.videos_table, S.captions_table):
        assert table(a).to_csv().encode() == table(b).to_csv().encode()
        assert not table(a).equals(table(c))
    assert a.ood.equals(b.ood) and not a.ood.equals(c.ood)
    assert S.summary(a) == S.summary(b)


def test_captions_state_every_attribute(tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    videos, captions = tables
    rows = videos.set_index("video_id")
    for cap in captions.itertuples():
        row = rows.loc[cap.video_id]
        content = content_of(row)
        assert S.parse_caption(cap.text) == content
        # independent of the parser: a synonym of every attribute value appears in the text
        text = cap.text
        for shape, colour in content.objects:
            assert any(w in text for w in S.SHAPE_WORDS[shape]), (text, shape)
            assert any(w in text for w in S.COLOUR_WORDS[colour]), (text, colour)
        assert any(w in text for w in S.BACKGROUND_WORDS[row.background]), text
        assert any(s in text or p in text for s, p in S.MOTION_WORDS[row.motion]), text
        if row.motion != "static":
            assert any(w in text for w in S.SPEED_WORDS[row.speed]), text
        assert words(text) <= known_words(), text


def test_paraphrases_are_distinct(tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    _, captions = tables
    train = captions[captions.split == "train"]
    assert train.groupby("video_id").text.nunique().eq(TINY.captions_per_clip).all()
    assert train.text.str.split().str[0].nunique() > 3  # varied templates, not one frame


def test_parse_caption_rejects_incomplete_captions() -> None:
    with pytest.raises(ValueError):
        S.parse_caption("a red circle on a black background")  # no motion
    with pytest.raises(ValueError):
        S.parse_caption("a red circle stays still quickly on a black background")  # static+speed
    c = S.parse_caption("on a dark backdrop, a crimson disc slides left fast")
    assert c == S.make_content([("circle", "red")], "black", "left", "fast")


def test_reversed_text_swaps_direction(tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    videos, captions = tables
    rows = videos.set_index("video_id")
    for cap in captions.itertuples():
        content = content_of(rows.loc[cap.video_id])
        if content.motion == "static":
            assert cap.reversed_text == ""
            continue
        assert S.parse_caption(cap.reversed_text) == content.reversed()
        assert cap.reversed_text != cap.text
    text = "on a gray canvas, a red dot slides left slowly"
    c = S.parse_caption(text)
    caps = S.captions_for(np.random.default_rng(0), c, 5)
    for t, rev in caps:
        flipped = {"left": "right", "leftward": "rightward"}
        assert [flipped.get(w, w) for w in t.split()] == rev.split()


def test_test_tuples_unique_and_val_tuples_unique(tables) -> None:
    videos, _ = tables
    for split in ("val", "test"):
        rows = videos[videos.split == split]
        tuples = [content_of(r) for _, r in rows.iterrows()]
        assert len(set(tuples)) == len(tuples)


def test_held_out_and_reserved_pairs(plan: S.Plan, tables) -> None:
    videos, _ = tables
    assert len(plan.holdout) == TINY.holdout_pairs and len(plan.reserved) == S.N_RESERVED
    held, reserved = set(plan.holdout), set(plan.reserved)
    for _, row in videos.iterrows():
        objs = set(content_of(row).objects)
        assert not objs & reserved  # never rendered anywhere
        if row.split != "test":
            assert not objs & held
        elif objs & held:
            assert not row.seen_combo
    test = videos[videos.split == "test"]
    assert any(set(content_of(r).objects) & held for _, r in test.iterrows())
    train = {content_of(r) for _, r in videos[videos.split == "train"].iterrows()}
    assert (test.seen_combo == [content_of(r) in train for _, r in test.iterrows()]).all()
    assert test.seen_combo.any() and not test.seen_combo.all()
    share = S.summary(plan)["synthetic"]["test_unseen_share"]
    assert share == pytest.approx(1 - test.seen_combo.mean())


def test_twins_differ_in_exactly_one_attribute(plan: S.Plan, tables) -> None:
    videos, _ = tables
    by_id = {c.video_id: c for c in plan.clips}
    twins = [c for c in plan.clips if c.twin_of]
    expected = 2 * round(TINY.n_test * TINY.twin_fraction / 2)
    assert len(twins) == expected
    for clip in twins:
        partner = by_id[clip.twin_of]
        assert partner.twin_of == clip.video_id and partner.split == "test"
        diff = S.attribute_diff(clip.content, partner.content)
        assert len(diff) == 1, (clip, partner)
        if clip.twin_kind == "reverse":
            assert clip.content == partner.content.reversed() != partner.content
    # a reversed twin is the partner played backwards: it starts where the partner ends
    big = S.plan_benchmark(dataclasses.replace(TINY, n_test=60, twin_fraction=1.0), seed=0)
    rev = [c for c in big.clips if c.twin_kind == "reverse" and c.index % 2 == 1]
    assert rev
    for clip in rev:
        base = next(c for c in big.clips if c.video_id == clip.twin_of)
        end = R.end_positions(np.asarray(base.starts), base.content.motion, base.content.speed,
                              TINY.size)
        assert np.allclose(end, clip.starts, atol=0.01)


def test_ood_captions_are_novel(plan: S.Plan, tables) -> None:
    ood = plan.ood
    assert list(ood.columns) == ["caption_id", "text", "kind"]
    assert ood.kind.value_counts().to_dict() == {"novel_word": TINY.n_ood,
                                                 "novel_composition": TINY.n_ood}
    assert ood.text.is_unique and ood.caption_id.is_unique
    vocab = known_words()
    _, captions = tables
    rendered_texts = set(captions.text)
    videos, _ = tables
    rendered = {content_of(r) for _, r in videos.iterrows()}
    for row in ood.itertuples():
        assert row.text not in rendered_texts
        if row.kind == "novel_word":
            assert words(row.text) - vocab, row.text  # some word the generator never renders
        else:
            assert words(row.text) <= vocab, row.text  # known words only ...
            c = S.parse_caption(row.text)  # ... in a combination no split renders
            assert c.n_objects > TINY.max_objects or set(c.objects) & set(plan.reserved)
            assert c not in rendered


def test_invalid_config_fails_with_a_reason() -> None:
    with pytest.raises(PipelineError, match="even"):
        S.plan_benchmark(dataclasses.replace(TINY, size=63), seed=0)
    with pytest.raises(PipelineError, match="max_objects"):
        S.plan_benchmark(dataclasses.replace(TINY, max_objects=5), seed=0)
    with pytest.raises(PipelineError, match="distinct attribute tuples"):
        S.plan_benchmark(dataclasses.replace(TINY, max_objects=1, n_test=2000), seed=0)


@pytest.mark.slow
def test_default_size_benchmark_is_well_posed() -> None:
    plan = S.plan_benchmark(SyntheticConfig(), seed=0)
    videos = S.videos_table(plan)
    test = videos[videos.split == "test"]
    assert len({content_of(r) for _, r in test.iterrows()}) == len(test) == 200
    facts = S.summary(plan)["synthetic"]
    assert 0.3 < facts["test_unseen_share"] < 1.0 and facts["test_heldout_pair_clips"] > 10
    assert facts["twin_kinds"].get("reverse", 0) >= 10


# ------------------------------------------------------------------------------------------------
# Rendering and encoding (a dozen clips)
# ------------------------------------------------------------------------------------------------


def test_generate_writes_clips_that_decode(rendered) -> None:
    ds = rendered
    assert ds.video_root.is_dir() and len(ds.videos) == 12
    assert set(ds.ood_captions.kind) == {"novel_word", "novel_composition"}
    assert "test_unseen_share" in ds.extra_summary["synthetic"]
    n_frames = R.n_frames_of(RENDER.seconds, RENDER.fps)
    for path in ds.videos.path:
        assert not Path(path).is_absolute()
        frames = R.decode_mp4(ds.video_root / path, RENDER.size)
        assert frames.shape == (n_frames, RENDER.size, RENDER.size, 3)


def test_clips_show_their_captions_colour_and_motion(rendered) -> None:
    ds = rendered
    palette = np.asarray(list(R.COLOURS.values()), dtype=float)
    names = list(R.COLOURS)
    for _, row in ds.videos[ds.videos.n_objects == 1].iterrows():
        frames = R.decode_mp4(ds.video_root / row.path, RENDER.size).astype(float)
        bg = np.asarray([R.BACKGROUNDS[row.background], *R.CHECKER_TONES] if
                        row.background == "checkered" else [R.BACKGROUNDS[row.background]])
        dist = np.linalg.norm(frames[..., None, :] - bg, axis=-1).min(-1)
        mask = dist > 80  # [T, H, W] object pixels
        assert mask.sum(axis=(1, 2)).min() > 20
        mean = frames[mask].mean(0)
        assert names[int(np.argmin(np.linalg.norm(palette - mean, axis=1)))] == row.colours
        ys, xs = np.nonzero(mask[0]), np.nonzero(mask[-1])
        dx = xs[1].mean() - ys[1].mean()
        dy = xs[0].mean() - ys[0].mean()
        growth = mask[-1].sum() / mask[0].sum()
        expect = {"left": dx < -5, "right": dx > 5, "up": dy < -5, "down": dy > 5,
                  "grow": growth > 1.5, "shrink": growth < 0.67,
                  "static": abs(dx) < 1 and abs(dy) < 1 and 0.8 < growth < 1.25}
        assert expect[row.motion], (row.video_id, row.motion, dx, dy, growth)


def test_noise_free_render_has_exact_colours() -> None:
    job = R.RenderJob("v", "/dev/null", ("triangle",), ("orange",), "white", "grow", "fast",
                      ((32.0, 32.0),), 64, 8, 32, 0.0, (0, 0, 0), "fp")
    frames = R.render_frames(job)
    obj = (frames != 255).any(-1)
    assert (frames[obj] == R.COLOURS["orange"]).all()
    area = obj.sum(axis=(1, 2))
    assert (np.diff(area) >= 0).all() and area[-1] > 4 * area[0]
    assert np.array_equal(frames, R.render_frames(job))


def test_rerun_reuses_current_clips_and_is_deterministic(rendered, tmp_path: Path) -> None:
    ds = rendered
    plan = S.plan_benchmark(RENDER, seed=1)
    jobs = S.render_jobs(plan, RENDER, 1, ds.video_root)
    assert S.render_all(jobs, workers=1, progress=False) == 0  # all current: nothing re-encoded
    # a fresh directory gives identical files for the same seed
    fresh = S.render_jobs(plan, RENDER, 1, tmp_path)[:2]
    assert S.render_all(fresh, workers=1, progress=False) == 2
    for job in fresh:
        old = ds.video_root / Path(job.path).name
        assert np.array_equal(R.decode_mp4(job.path, RENDER.size), R.decode_mp4(old, RENDER.size))
    # a clip from another seed carries another fingerprint and is replaced
    other = S.render_jobs(S.plan_benchmark(RENDER, seed=2), RENDER, 2, tmp_path)[:1]
    assert other[0].fingerprint != fresh[0].fingerprint
    assert S.render_all(other, workers=1, progress=False) == 1
