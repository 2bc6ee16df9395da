"""Inception FID plumbing: weights come from the user's file, read with weights_only=True; never the network."""

import sys
import types

import pytest
import torch

from flexdiff.errors import FlexdiffError
from flexdiff.metrics.inception import InceptionFeatures

URL = "https://example.invalid/fid_weights/pt_inception-2015-12-05-6726825d.pth"


@pytest.fixture
def fake_pytorch_fid(monkeypatch):
    """Stands in for pytorch-fid (which needs torchvision): loads its weights the way pytorch-fid does."""

    class InceptionV3(torch.nn.Module):
        BLOCK_INDEX_BY_DIM = {2048: 3}

        def __init__(self, blocks):
            super().__init__()
            self.lin = torch.nn.Linear(3, 4)
            self.lin.load_state_dict(mod.load_state_dict_from_url(URL, progress=True))

        def forward(self, x):
            return [self.lin(x.mean((2, 3)))[:, :, None, None]]

    pkg = types.ModuleType("pytorch_fid")
    mod = types.ModuleType("pytorch_fid.inception")
    mod.InceptionV3, mod.FID_WEIGHTS_URL = InceptionV3, URL

    def download(url, *args, **kwargs):  # pytorch-fid's own: fetch, then torch.load(weights_only=False)
        raise AssertionError("tried to download the Inception weights")

    mod.load_state_dict_from_url = download
    pkg.inception = mod
    monkeypatch.setitem(sys.modules, "pytorch_fid", pkg)
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", mod)
    return mod


def test_loads_weights_from_local_file_without_network(fake_pytorch_fid, tmp_path):
    weights = torch.nn.Linear(3, 4).state_dict()
    torch.save(weights, tmp_path / "my_inception.pth")
    hub_before = torch.hub.get_dir()
    feats = InceptionFeatures(tmp_path / "my_inception.pth")
    assert torch.equal(feats.model.lin.weight, weights["weight"])
    assert torch.hub.get_dir() == hub_before
    out = feats(torch.zeros(5, 1, 16, 16))
    assert out.shape == (5, 4)


def test_missing_weights_file(fake_pytorch_fid, tmp_path):
    with pytest.raises(FlexdiffError, match="no such file"):
        InceptionFeatures(tmp_path / "absent.pth")


def test_missing_package_names_the_extra(monkeypatch, tmp_path):
    (tmp_path / "w.pth").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", None)
    with pytest.raises(FlexdiffError, match=r"flexdiff\[inception\]"):
        InceptionFeatures(tmp_path / "w.pth")


def test_a_pickle_with_code_is_refused_and_never_run(fake_pytorch_fid, tmp_path):
    marker = tmp_path / "ran.txt"

    class Payload:  # unpickling this runs code: what a hostile file can do under weights_only=False
        def __reduce__(self):
            return (exec, (f"import pathlib; pathlib.Path({str(marker)!r}).write_text('pwned')",))

    torch.save({"weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(FlexdiffError, match="not a plain weights file"):
        InceptionFeatures(tmp_path / "evil.pth")
    assert not marker.exists()
    torch.load(tmp_path / "evil.pth", weights_only=False)  # the file is live: unpickling it would have run it
    assert marker.exists()
    with pytest.raises(AssertionError, match="download"):  # pytorch-fid's own loader is back in place
        fake_pytorch_fid.load_state_dict_from_url("x")
