from __future__ import annotations

import dataclasses
import math

import pytest

from umgclip.config import ConfigError, load_config, parse_override
from umgclip.data.schema import SCHEMA_VERSION, Region, Sample, SchemaError


def _sample() -> Sample:
    return Sample(
        key="000000000139",
        width=640,
        height=426,
        captions=["a room with a tv", "a living room"],
        tags=["tv", "person"],
        regions=[
            Region(
                box=[10.0, 20.5, 100.0, 200.0],
                tags=["tv"],
                mask={"size": [426, 640], "counts": "abc"},
            ),
            Region(
                box=[0, 0, 640, 426], tags=["wall"], kind="stuff", score=0.5, source="coco_panoptic"
            ),
        ],
        source={"dataset": "coco"},
        caption_sources=["human", "human"],
        panoptic={"segments": [{"id": 3, "category_id": 1, "category": "person", "isthing": True}]},
    )


def test_sample_json_round_trip_is_exact() -> None:
    s = _sample()
    s.validate()
    back = Sample.from_json(s.to_json())
    assert back == s
    assert back.to_json() == s.to_json()
    assert back.schema_version == SCHEMA_VERSION
    assert isinstance(back.regions[1].box[0], float)


@pytest.mark.parametrize(
    "box",
    [
        [0, 0, 0, 10],
        [5, 5, 1, 10],
        [0, 0, math.nan, 5],
        [0, 0, math.inf, 5],
        [700, 0, 800, 10],
        [1, 2, 3],
    ],
)
def test_region_validation_rejects_bad_boxes(box: list[float]) -> None:
    s = _sample()
    s.regions[0].box = box
    with pytest.raises(SchemaError):
        s.validate()


def test_schema_rejects_unknown_fields_and_future_versions() -> None:
    d = _sample().to_dict()
    d["colour"] = "red"
    with pytest.raises(SchemaError, match="unknown sample fields"):
        Sample.from_dict(d)
    d = _sample().to_dict()
    d["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(SchemaError, match="newer"):
        Sample.from_dict(d).validate()


def test_mask_size_must_match_image() -> None:
    s = _sample()
    s.regions[0].mask = {"size": [10, 10], "counts": "x"}
    with pytest.raises(SchemaError, match="mask size"):
        s.validate()


@dataclasses.dataclass
class _Inner:
    lr: float = 1e-3
    layers: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    name: str | None = None


@dataclasses.dataclass
class _Outer:
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    steps: int = 10
    bf16: bool = True


def test_config_yaml_and_overrides(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  lr: 0.5\nsteps: 3\n")
    cfg = load_config(_Outer, p, ["inner.layers=[4, 5]", "bf16=false", "inner.name=vit"])
    assert cfg == _Outer(inner=_Inner(lr=0.5, layers=[4, 5], name="vit"), steps=3, bf16=False)
    assert load_config(_Outer) == _Outer()


def test_config_rejects_unknown_keys_and_bad_types(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  lrr: 0.5\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(_Outer, p)
    with pytest.raises(ConfigError):
        load_config(_Outer, None, ["steps=1.5"])
    with pytest.raises(ConfigError):
        parse_override("noequals")
