"""Search spaces, ops, supernet, subnets, BN indicator and cost tables (issue 2)."""

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

import search_spaces as ss
from search_spaces import (ArchitectureError, OpError, SpaceError, Supernet, arch_score, arch_scores,
                           bn_indicator, build_subnet, cost_tables, count_model, freeze, get_space,
                           list_spaces, subnet_state_from_supernet)

SPACES = list_spaces()
SMALL = ["mobilenet_small", "shufflenet_small"]


def random_arch(space, rng):
    return tuple(rng.choice([k for k, ok in enumerate(layer.allowed) if ok]) for layer in space.layers)


def small_input(space, batch=2):
    # 224 px spaces are tested at 64 px: shapes and invariants do not depend on resolution.
    size = min(space.input_size, 64)
    return torch.randn(batch, space.in_channels, size, size)


@pytest.fixture(scope="module")
def supernets():
    torch.manual_seed(0)
    return {name: Supernet(get_space(name)) for name in SPACES}


# ----------------------------------------------------------------- published numbers

BNNAS_PAPER = [3, -1, 0, 4, 0, -1, -1, 0, 4, -1, 4, 4, 1, 4, 2, 0, 0, 4, 0, 2, 2]  # authors' format


def test_bnnas_published_architecture_costs():
    space = get_space("bnnas_mobilenet")
    arch = space.validate(BNNAS_PAPER)  # the authors' -1 is read as identity
    assert space.authors_arch(arch) == BNNAS_PAPER
    assert [space.op_names(arch)[l] for l in (1, 5, 6, 9)] == ["identity"] * 4
    flops, params = cost_tables(space).cost(arch)
    assert abs(flops / 473.5e6 - 1) < 0.015, flops  # the paper's 473.5M / 5.2M
    assert abs(params / 5.2e6 - 1) < 0.015, params
    assert (round(flops / 1e5), round(params / 1e4)) == (4718, 523)  # 471.8M / 5.23M, as before


def test_spos_published_architecture_costs():
    space = get_space("spos_shufflenet")
    arch = (2, 1, 0, 1, 2, 0, 2, 0, 2, 0, 2, 3, 0, 0, 0, 0, 3, 2, 3, 3)
    flops, params = cost_tables(space).cost(arch)
    assert abs(flops / 323e6 - 1) < 0.015, flops
    # SPOS's BNs are affine=False, so its 3.5M has no BN gammas/betas; BN-NAS needs them.
    net = build_subnet(space, arch)
    bn_params = sum(p.numel() for m in net.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert abs((params - bn_params) / 3.5e6 - 1) < 0.015, (params, bn_params)
    assert params == sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name,layers,choices", [
    ("spos_shufflenet", 20, 4), ("bnnas_mobilenet", 21, 7), ("fairnas_mobilenet", 19, 6)])  # 6 ops + fixed identity
def test_published_space_shapes(name, layers, choices):
    space = get_space(name)
    assert (space.num_layers, space.num_choices, space.input_size) == (layers, choices, 224)


def test_bnnas_fixed_depth_as_the_authors():
    # BNNAS/supernet/train.py and search/ea.py: layers 1, 5, 6, 9 are -1 in every path and
    # candidate; every other layer draws one of the 6 MBConv ops.
    space = get_space("bnnas_mobilenet")
    assert space.identity_layers == (1, 5, 6, 9) and space.searchable_identity == ()
    for layer in space.layers:
        if layer.index in (1, 5, 6, 9):
            assert layer.fixed_identity and not layer.free and layer.ops[layer.identity_choice] == "identity"
        else:
            assert layer.free and sum(layer.allowed) == 6 and "identity" not in layer.ops
    assert space.size == 6 ** 17


@pytest.mark.parametrize("name", SPACES)
def test_no_builtin_space_lets_identity_compete(name):
    # The BN indicator cannot score identity: every built-in space has fixed depth.
    assert get_space(name).searchable_identity == ()


def test_mobilenet_small_fixed_depth():
    space = get_space("mobilenet_small")
    assert space.identity_layers == (1,) and space.size == 6 ** 6
    assert [layer.fixed_identity for layer in space.layers] == [False, True] + [False] * 5


# ----------------------------------------------------------------- every built-in space

@pytest.mark.parametrize("name", SPACES)
def test_random_archs_give_right_output_shape(name, supernets):
    space, net = get_space(name), supernets[name]
    rng = random.Random(0)
    net.eval()
    with torch.no_grad():
        for _ in range(3):
            y = net(small_input(space), random_arch(space, rng))
            assert y.shape == (2, space.num_classes)
            assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", SPACES)
def test_table_cost_equals_direct_count(name):
    space = get_space(name)
    tables = cost_tables(space)
    assert tables.flops.shape == tables.params.shape == (space.num_layers, space.num_choices)
    rng = random.Random(1)
    archs = [random_arch(space, rng) for _ in range(2)]
    for arch in archs:
        with torch.device("meta"):
            subnet = build_subnet(space, arch)
        flops, params = _count_meta(subnet, space)
        assert tables.cost(arch) == (flops, params)
    f, p = tables.costs(np.array(archs))
    assert list(zip(f, p)) == [tables.cost(a) for a in archs]


def _count_meta(model, space):
    from search_spaces.costs import count
    x = torch.empty(1, space.in_channels, space.input_size, space.input_size, device="meta")
    flops, params, _ = count(model, x)
    return flops, params


def test_count_model_on_real_weights_matches_tables():
    space = get_space("mobilenet_small")
    arch = random_arch(space, random.Random(3))
    assert count_model(build_subnet(space, arch), space) == cost_tables(space).cost(arch)


@pytest.mark.parametrize("name", SPACES)
@pytest.mark.parametrize("mode", ["bn_last", "bn_all", "all"])
def test_freeze_modes_and_no_frozen_grads(name, mode):
    space = get_space(name)
    torch.manual_seed(0)
    net = Supernet(space)
    trainable = freeze(net, mode)
    last_bns = {id(p) for _, _, op in net.candidate_ops() if ss.last_bn(op) is not None
                for p in ss.last_bn(op).parameters()}
    all_bns = {id(p) for m in net.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    expected = {"bn_last": last_bns, "bn_all": all_bns, "all": {id(p) for p in net.parameters()}}[mode]
    assert {id(p) for p in trainable} == expected
    assert {id(p) for p in net.parameters() if p.requires_grad} == expected
    arch = random_arch(space, random.Random(2))
    net.train()
    net(small_input(space), arch).sum().backward()
    for p in net.parameters():
        if not p.requires_grad:
            assert p.grad is None
    got_grad = [p for p in trainable if p.grad is not None]
    assert got_grad, "the chosen path's trainable parameters must receive gradients"


@pytest.mark.parametrize("name", SPACES)
def test_known_gammas_give_known_indicator(name, supernets):
    space, net = get_space(name), supernets[name]
    expected = np.full((space.num_layers, space.num_choices), np.nan)
    with torch.no_grad():
        for l, k, op in net.candidate_ops():
            bn = ss.last_bn(op)
            if bn is None:
                expected[l, k] = 0.0
                continue
            g = torch.full_like(bn.weight, 0.01 * (l + 1) + 0.1 * k)
            g[::2] *= -1  # |gamma|: the sign must not matter
            bn.weight.copy_(g)
            expected[l, k] = 0.01 * (l + 1) + 0.1 * k
    table = bn_indicator(net)
    np.testing.assert_allclose(table, expected, rtol=1e-6)
    for layer in space.layers:  # forbidden choices are marked, not scored
        for k in range(space.num_choices):
            forbidden = k >= len(layer.ops) or not layer.allowed[k]
            assert np.isnan(table[layer.index, k]) == forbidden
    arch = random_arch(space, random.Random(4))
    assert arch_score(table, arch) == pytest.approx(sum(expected[l, a] for l, a in enumerate(arch)))
    assert arch_scores(table, np.array([arch, arch]))[1] == pytest.approx(arch_score(table, arch))


@pytest.mark.parametrize("name", SPACES)
def test_subnet_matches_supernet_in_eval(name, supernets):
    space, net = get_space(name), supernets[name]
    arch = random_arch(space, random.Random(5))
    with torch.no_grad():  # non-trivial BN statistics so the mapping is really checked
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    sub = build_subnet(space, arch)
    missing = sub.load_state_dict(subnet_state_from_supernet(net.state_dict(), arch), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    assert not any("supernet" in type(m).__name__.lower() for m in sub.modules())
    net.eval(), sub.eval()
    x = small_input(space)
    with torch.no_grad():
        torch.testing.assert_close(sub(x), net(x, arch), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- spaces as data

def test_fingerprint_stable_and_sensitive():
    a, b = get_space("mobilenet_small"), get_space("mobilenet_small")
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    assert a.with_data(in_channels=1, num_classes=10).fingerprint != a.fingerprint
    assert get_space("shufflenet_small").fingerprint != a.fingerprint


def test_yaml_space_round_trip(tmp_path):
    import yaml
    base = get_space("mobilenet_small")
    d = base.to_dict()
    d["name"] = "my_space"
    assert d.pop("identity_layers") == [1]  # the YAML key; without it, layer 1 is a stage's first
    d["stages"][0]["depth"] = 1
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(d))
    space = get_space(str(p))
    assert space.name == "my_space" and space.num_layers == base.num_layers - 1
    y = Supernet(space).eval()(torch.randn(1, 3, 32, 32), [0] * space.num_layers)
    assert y.shape == (1, 10)


def test_user_registered_op_and_space(tmp_path):
    import yaml
    ss.register_op("conv3_bn_test", lambda cin, cout, s: nn.Sequential(
        nn.Conv2d(cin, cout, 3, s, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()))
    d = get_space("mobilenet_small").to_dict()
    for st in d["stages"]:
        st["ops"] = ["conv3_bn_test", "mbconv_k3_e3"]
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(d))
    net = Supernet(get_space(str(p)))
    assert isinstance(ss.last_bn(net.layers[0]["0"]), nn.BatchNorm2d)


# ----------------------------------------------------------------- bad input

@pytest.fixture
def mob():
    return get_space("mobilenet_small")


def test_arch_wrong_length(mob):
    with pytest.raises(ArchitectureError, match="has 3 choices but space 'mobilenet_small' has 7 layers"):
        mob.validate([0, 0, 0])


def test_arch_index_out_of_range(mob):
    with pytest.raises(ArchitectureError, match=r"layer 2: choice 9 is out of range 0\.\.5"):
        mob.validate([0, 6, 9, 0, 0, 0, 0])


def test_arch_fixed_identity_layer(mob):
    assert mob.validate([0, -1, 0, 0, 0, 0, 0]) == mob.validate([0, 6, 0, 0, 0, 0, 0]) == (0, 6, 0, 0, 0, 0, 0)
    with pytest.raises(ArchitectureError, match="layer 1 is fixed to identity in space 'mobilenet_small' "
                                                r"\(choice 6 or -1\), got 0"):
        mob.validate([0, 0, 0, 0, 0, 0, 0])
    with pytest.raises(ArchitectureError, match=r"layer 0: -1 \(identity\) is not allowed there \(no identity"):
        mob.validate([-1, 6, 0, 0, 0, 0, 0])


def test_arch_identity_forbidden_in_first_layer_of_a_stage(mob):
    d = mob.to_dict()
    d.pop("identity_layers")
    for st in d["stages"]:
        st["ops"] = ["mbconv_k3_e3", "identity"]  # free depth: identity a choice where the shape allows
    free = ss.space_from_dict(d)
    assert free.searchable_identity == (1, 3, 5)
    with pytest.raises(ArchitectureError, match="layer 0: 'identity' is not allowed"):
        free.validate([1, 0, 0, 0, 0, 0, 0])
    with pytest.raises(ArchitectureError, match=r"layer 2: -1 \(identity\) is not allowed there \(first layer of stage 1"):
        free.validate([0, 0, -1, 0, 0, 0, 0])
    assert free.authors_arch(free.validate([0, -1, 0, 1, 0, 0, 0])) == [0, -1, 0, -1, 0, 0, 0]


@pytest.mark.parametrize("layers,message", [
    ([7], r"identity_layers: 7 is not a layer index 0\.\.6"),
    ([1, 1], "lists a layer twice"),
    ([2], "layer 2 is the first layer of stage 1, which changes the shape"),
])
def test_identity_layers_checked(mob, layers, message):
    d = mob.to_dict()
    d["identity_layers"] = layers
    with pytest.raises(SpaceError, match=message):
        ss.space_from_dict(d)


def test_arch_json_round_trip_and_other_space(mob):
    arch = (1, 6, 2, 0, 3, 4, 5)
    text = mob.arch_to_json(arch)
    assert json.loads(text)["fingerprint"] == mob.fingerprint
    assert json.loads(text)["arch_authors"] == [1, -1, 2, 0, 3, 4, 5]
    assert mob.arch_from_json(text) == arch
    other = get_space("shufflenet_small")
    with pytest.raises(ArchitectureError, match="is for space 'mobilenet_small'.*not 'shufflenet_small'"):
        other.arch_from_json(text)
    with pytest.raises(ArchitectureError, match="not an architecture JSON"):
        mob.arch_from_json("{}")


def test_unknown_op_in_space(mob):
    d = mob.to_dict()
    d["stages"][1]["ops"] = ["mbconv_k9_e9"]
    with pytest.raises(SpaceError, match="stage 1: unknown op 'mbconv_k9_e9'"):
        ss.space_from_dict(d)
    with pytest.raises(OpError, match="unknown op 'nope'"):
        ss.create_op("nope", 8, 8, 1)


def test_op_without_trailing_bn_is_refused(mob):
    ss.register_op("conv_no_bn_test", lambda cin, cout, s: nn.Sequential(
        nn.Conv2d(cin, cout, 1, s), nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 1)))
    d = mob.to_dict()
    d["stages"][0]["ops"] = ["conv_no_bn_test"]
    with pytest.raises(OpError, match="op 'conv_no_bn_test' does not end in an affine BatchNorm2d.*Conv2d"):
        Supernet(ss.space_from_dict(d))
    ss.register_op("bn_no_affine_test", lambda cin, cout, s: nn.Sequential(
        nn.Conv2d(cin, cout, 1, s), nn.BatchNorm2d(cout, affine=False)))
    with pytest.raises(OpError, match="bn_no_affine_test"):
        ss.create_op("bn_no_affine_test", 8, 8, 1)


def test_malformed_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nstages: [\n  - {channels: 8\n")
    with pytest.raises(SpaceError, match=r"is not valid YAML at line \d+"):
        get_space(str(p))
    p.write_text("name: x\ninput_size: 32\nhead: {channels: 8}\n")
    with pytest.raises(SpaceError, match="not a valid space definition.*stages"):
        get_space(str(p))
    p.write_text("name: x\ninput_size: 32\nhead: {channels: 8}\nstages: []\nextra: 1\n")
    with pytest.raises(SpaceError, match="unknown key 'extra'"):
        get_space(str(p))


def test_unknown_space_name():
    with pytest.raises(SpaceError, match="unknown space 'nope'; built-in spaces: bnnas_mobilenet"):
        get_space("nope")


# ----------------------------------------------------------------- residual-friendly op set (issue 14)

def test_pad_shortcut_makes_every_layer_residual_and_subnets_match():
    d = get_space("mobilenet_small").to_dict()
    d["shortcut"] = "pad"
    space = ss.space_from_dict(d).with_data(in_channels=1, num_classes=10, input_size=28)  # odd sizes: 14 -> 7 -> 4
    assert space.fingerprint != get_space("mobilenet_small").with_data(
        in_channels=1, num_classes=10, input_size=28).fingerprint
    torch.manual_seed(0)
    net = Supernet(space).eval()
    wrapped = [l for l, k, op in net.candidate_ops() if isinstance(op, ss.network.PadShortcut)]
    assert sorted(set(wrapped)) == [0, 2, 4, 6]  # the layers that change shape (16->24, strides 2, 80->96)
    for l, _, op in net.candidate_ops():
        assert (ss.last_bn(op) is None) == (l == 1)  # the scored BN is still the op's own (layer 1: identity)
    arch = random_arch(space, random.Random(0))
    sub = build_subnet(space, arch)
    sub.load_state_dict(subnet_state_from_supernet(net.state_dict(), arch), strict=True)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(sub.eval()(x), net(x, arch))
    assert cost_tables(space).cost(arch) == cost_tables(get_space("mobilenet_small").with_data(
        in_channels=1, num_classes=10, input_size=28)).cost(arch)  # the shortcut is free


def test_with_scored_gammas_at_zero_every_path_is_the_same_function():
    # What the residual-friendly recipe relies on: the shared head sees one function at init.
    from pipeline.train_supernet import init_supernet

    d = get_space("mobilenet_small").to_dict()
    d["shortcut"] = "pad"
    space = ss.space_from_dict(d)
    net = init_supernet(space, 0, gamma_init=0.0).train()
    x = torch.randn(4, 3, 32, 32)
    rng = random.Random(1)
    with torch.no_grad():
        outs = [net(x, random_arch(space, rng)) for _ in range(3)]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=0)
    plain = init_supernet(get_space("mobilenet_small"), 0, gamma_init=0.0).train()
    with torch.no_grad():  # without the shortcut a gamma of 0 would cut the network
        assert plain(x, random_arch(space, rng)).std(0).max() < 1e-6


def test_unknown_shortcut_is_refused(mob):
    d = mob.to_dict()
    d["shortcut"] = "conv"
    with pytest.raises(SpaceError, match="shortcut 'conv' is not one of '', 'pad'"):
        ss.space_from_dict(d)
