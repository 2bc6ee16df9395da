import json

import pytest

from flexdiff.errors import FlexdiffError
from flexdiff.schedule import FULL, NULL, Schedule, Step, StepKind, partial


def test_json_round_trip(tmp_path):
    s = Schedule("dpmsolver++", (FULL, partial(2), NULL, FULL, partial(0)), name="x", meta={"a": 1})
    path = s.save(tmp_path / "s.json")
    back = Schedule.load(path)
    assert back == s and back.meta == {"a": 1}
    assert json.loads(path.read_text())["steps"] == ["full", "partial:2", "null", "full", "partial:0"]


def test_deepcache_pattern():
    s = Schedule.deepcache("ddim", 7, 3, 1)
    assert [x.to_str() for x in s.steps] == ["full", "partial:1", "partial:1", "full", "partial:1", "partial:1", "full"]
    assert s.counts() == {"full": 3, "partial": 4, "null": 0}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"sampler": "ddim", "steps": ["null", "full"]}, "step 0 is null"),
        ({"sampler": "ddim", "steps": ["partial:1", "full"]}, "first step must be full"),
        ({"sampler": "ddim", "steps": ["full", "half"]}, "steps[1]: unknown step kind 'half'"),
        ({"sampler": "ddim", "steps": ["full", "partial"]}, "needs a branch number"),
        ({"sampler": "ddim", "steps": ["full", "null:2"]}, "only partial steps take a branch"),
        ({"sampler": "plms", "steps": ["full"]}, "'plms' is not one of ddim"),
        ({"sampler": "ddim", "steps": []}, "at least one step"),
        ({"sampler": "ddim", "steps": ["full", "null"], "num_steps": 3}, "num_steps is 3"),
        ({"steps": ["full"]}, "missing field 'sampler'"),
        ({"sampler": "ddim", "steps": "full"}, "'steps' must be a list"),
    ],
)
def test_invalid_schedules_name_the_problem(tmp_path, data, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(FlexdiffError) as e:
        Schedule.load(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_unreadable_schedule_files(tmp_path):
    with pytest.raises(FlexdiffError, match="no such file"):
        Schedule.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FlexdiffError, match="not valid JSON"):
        Schedule.load(tmp_path / "bad.json")


def test_check_fits():
    s = Schedule("ddim", (FULL, partial(5)))
    s.check_fits(6)
    with pytest.raises(FlexdiffError, match="uses branch 5, but this model has branches 0..4"):
        s.check_fits(5)
    with pytest.raises(FlexdiffError, match="has 2 steps but the sampler runs 3"):
        s.check_fits(6, num_steps=3)


def test_step_validation():
    with pytest.raises(FlexdiffError):
        Step(StepKind.PARTIAL, None)
    with pytest.raises(FlexdiffError):
        Step(StepKind.FULL, 1)


def test_unknown_schedule_field_is_refused_by_name():
    from flexdiff.errors import FlexdiffError

    d = Schedule.full("ddim", 3).to_dict()
    d["stepz"] = d["steps"]
    with pytest.raises(FlexdiffError, match="unknown field 'stepz'"):
        Schedule.from_dict(d, "my.json")
