"""python -m pipeline.arch and the authors' architecture format (-1 = identity), issue 13."""

import json

import pytest
import torch

from pipeline.arch import main
from search_spaces import build_subnet, cost_tables, get_space
from search_spaces.costs import count

PAPER = [3, -1, 0, 4, 0, -1, -1, 0, 4, -1, 4, 4, 1, 4, 2, 0, 0, 4, 0, 2, 2]  # BN-NAS, as published


def test_published_bnnas_architecture_through_the_cli(capsys):
    assert main(["bnnas_mobilenet", json.dumps(PAPER)]) == 0
    out = capsys.readouterr().out
    assert "multiply-adds  471.8M  (471822240)" in out
    assert "params         5.229M  (5228536)" in out
    assert f"authors' form  {PAPER}" in out
    assert out.count("identity") == 4 and out.count("(fixed)") == 4
    assert main(["bnnas_mobilenet", ",".join(map(str, PAPER)), "--json"]) == 0  # no brackets, JSON out
    d = json.loads(capsys.readouterr().out)
    assert d["arch_authors"] == PAPER and d["arch"][1] == 6 and (d["flops"], d["params"]) == (471822240, 5228536)


def test_published_bnnas_architecture_through_the_python_api():
    space = get_space("bnnas_mobilenet")
    with torch.device("meta"):
        net = build_subnet(space, PAPER)  # the authors' list as it is
    flops, params, _ = count(net, torch.empty(1, 3, 224, 224, device="meta"))
    assert (flops, params) == cost_tables(space).cost(space.validate(PAPER)) == (471822240, 5228536)
    assert space.authors_arch(net.arch) == PAPER


def test_arch_json_file_from_an_export(tmp_path, capsys):
    space = get_space("mobilenet_small")
    path = tmp_path / "arch.json"
    path.write_text(space.arch_to_json([0, -1, 1, 2, 3, 4, 5]))
    assert main(["mobilenet_small", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["arch_authors"] == [0, -1, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("argv,message", [
    (["bnnas_mobilenet", "[3,0,0,4,0,-1,-1,0,4,-1,4,4,1,4,2,0,0,4,0,2,2]"],
     "layer 1 is fixed to identity in space 'bnnas_mobilenet' (choice 6 or -1), got 0"),
    (["bnnas_mobilenet", "[3,-1]"], "architecture has 2 choices but space 'bnnas_mobilenet' has 21 layers"),
    (["bnnas_mobilenet", "three"], "architecture 'three' is neither a list of integers"),
    (["nope", "[0]"], "unknown space 'nope'"),
])
def test_bad_input_is_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bnnas: error: ") and message in err
