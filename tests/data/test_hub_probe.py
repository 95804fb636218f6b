"""`require_hub`: one short metadata request per Hub repository and process when it answers (the preflight and the
loader both ask), a one-line error every time it does not."""

import pytest

from sae_dist.data import source
from sae_dist.data.source import DataUnavailableError, require_hub


class FakeHub:
    def __init__(self, answers: bool):
        self.answers, self.requests = answers, []

    def __call__(self):  # stands in for the HfApi class: HfApi() returns this client
        return self

    def repo_info(self, repo_id, repo_type, timeout):
        self.requests.append((repo_id, repo_type))
        if not self.answers:
            raise OSError("offline")


@pytest.fixture(autouse=True)
def fresh_answers():
    source._hub_answers.cache_clear()
    yield
    source._hub_answers.cache_clear()


def test_an_answer_is_asked_for_once(monkeypatch):
    hub = FakeHub(answers=True)
    monkeypatch.setattr(source, "HfApi", hub)
    for _ in range(3):
        require_hub("org/model", "model", "hint")
    require_hub("org/data", "dataset", "hint")
    assert hub.requests == [("org/model", "model"), ("org/data", "dataset")]


def test_no_answer_fails_every_time(monkeypatch):
    hub = FakeHub(answers=False)
    monkeypatch.setattr(source, "HfApi", hub)
    expected = r"cannot download dataset 'org/data' from the Hub \(offline\); hint"
    for _ in range(2):
        with pytest.raises(DataUnavailableError, match=expected):
            require_hub("org/data", "dataset", "hint")
    assert len(hub.requests) == 2
