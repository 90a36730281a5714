"""Structured pruning: whole channels off, physically smaller models with the same outputs, exports, text data."""

import json
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from patcli.config import NamedConfig
from patcli.data import load_dataset
from patcli.engine import PATTERNS, SCHEDULES, SCORERS, Pruner
from patcli.engine.compressed import compress, decompress
from patcli.engine.surgery import live_channels, param_count, resize_like, shapes_of, shrink
from patcli.models import build_model

from conftest import result_of, run_dir_of

DIGITS_META = {"input_shape": [64], "image_shape": [1, 8, 8], "num_classes": 10}
TEXT_META = {"vocab_size": 20, "block_size": 16, "input_shape": [16], "num_classes": 20}


def model_of(name, meta, **params):
    torch.manual_seed(0)
    return build_model(NamedConfig(name, params), meta)


def pruned(model, mode, sparsity, **pruner):
    """One-shot structured prune through the engine (what a PAT run does at its final update)."""
    p = Pruner(model, sparsity=sparsity, schedule=SCHEDULES.get("fixed")(), total_steps=1,
               pattern=PATTERNS.get(mode)(), **pruner)
    p.update_masks(0, sparsity)
    return p


def randomise_norms(model):
    """BatchNorm with non-trivial statistics, so surgery must cut running stats correctly."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)


@pytest.mark.parametrize(
    "name, meta, params, mode, inputs",
    [
        ("mlp", DIGITS_META, {"hidden": [64, 48]}, "neurons", lambda: torch.rand(8, 64)),
        ("cnn", DIGITS_META, {"channels": [8, 16, 16]}, "filters", lambda: torch.rand(8, 64)),
        ("gpt", TEXT_META, {"n_layer": 2, "n_head": 4, "d_model": 32}, "heads", lambda: torch.randint(0, 20, (4, 16))),
        ("gpt", TEXT_META, {"n_layer": 1, "n_head": 2, "d_model": 16}, "neurons", lambda: torch.randint(0, 20, (4, 16))),
    ],
)
def test_surgery_gives_a_smaller_model_with_the_masked_models_outputs(name, meta, params, mode, inputs):
    model = model_of(name, meta, **params)
    randomise_norms(model)
    pruner = pruned(model, mode, 0.5)
    model.eval()
    groups = pruner.layout.groups
    for group, keep in zip(groups, pruner.layout.group_keep):  # whole channels only: a slice is all-zero or kept
        for part in group.slices:
            rows = dict(model.named_parameters())[part.param].detach().movedim(part.dim, 0).reshape(group.channels, -1)
            assert bool((rows[~keep] == 0).all())
    small = shrink(model, groups, live_channels(model, groups)).eval()
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
    masked_out = sum(int((~keep).sum()) for keep in pruner.masks.keep)
    assert masked_out > 0 and param_count(model) - param_count(small) == masked_out  # exactly the pruned slices are gone
    fresh = resize_like(model_of(name, meta, **params), shapes_of(small))  # what load_pruned does
    fresh.load_state_dict(small.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), small(x))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return x + torch.relu(self.fc(x))


@pytest.mark.parametrize("norm", [nn.BatchNorm2d(8, affine=False), nn.BatchNorm2d(8, track_running_stats=False),
                                  nn.BatchNorm2d(8, affine=False, track_running_stats=False), None],
                         ids=["bn-not-affine", "bn-no-running-stats", "bn-holding-no-tensor", "bn1d-over-flattened-features"])
def test_chains_with_norms_of_every_kind_shrink_to_the_masked_models_outputs(norm):
    """Each once crashed the pruner or the export after training, losing the run."""
    torch.manual_seed(0)
    if norm is None:
        model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(288), nn.Linear(288, 3))
        model[3].running_mean.uniform_(-1, 1)
        nn.init.uniform_(model[3].bias, -0.5, 0.5)
    else:
        model = nn.Sequential(nn.Conv2d(4, 8, 3), norm, nn.ReLU(), nn.Flatten(), nn.Linear(288, 3))
    pruner = pruned(model, "filters", 0.5)
    model.eval()
    small = shrink(model, pruner.layout.groups, live_channels(model, pruner.layout.groups)).eval()
    x = torch.randn(4, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
    assert small[0].out_channels == 4


def test_a_layer_whose_every_channel_is_zero_keeps_one_and_computes_what_the_masked_model_does():
    """A penalty (group lasso at a high lam) can zero every filter of a layer: the shrunk copy had a Conv2d with 0
    output channels and a BatchNorm2d(0), whose forward fails, and the run that exported it was recorded failed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6),
                          nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    pruner = pruned(model, "filters", 0.0)
    with torch.no_grad():  # the first conv's every channel off, in each slice of its group (weights, bias, γ, β)
        for part in next(g for g in pruner.layout.groups if g.slices[0].param == "0.weight").slices:
            model.get_parameter(part.param).zero_()
        model[4].running_mean.uniform_(-1, 1)
    model.eval()
    small = shrink(model, pruner.layout.groups, live_channels(model, pruner.layout.groups)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=0)
    assert (small[0].out_channels, small[1].num_features, small[3].in_channels, small[3].out_channels) == (1, 1, 1, 6)


def neurons_pruned_by_activation(model):
    """Half the weights of ``model`` (inputs of 6) pruned in neurons, scored by activations over two training steps;
    the pruner stays attached and watching."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = Pruner(model, sparsity=0.5, schedule=SCHEDULES.get("oneshot")(), total_steps=4,
                    pattern=PATTERNS.get("neurons")(), scorer=SCORERS.get("activation")()).attach(optimizer)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(5, 6)).sum().backward()
        optimizer.step()
    return pruner


def test_a_model_shrunk_while_a_channel_scorer_watches_it_carries_none_of_its_hooks():
    """The copy carried the activation scorer's hooks: its narrower activations failed the scorer's reshape in
    train mode (and a head scorer's would have been added into the live pruner's sums)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    pruner = neurons_pruned_by_activation(model)
    small = shrink(model, pruner.layout.groups, live_channels(model, pruner.layout.groups)).train()
    sums = [s.clone() for s in pruner.scorer._sums]
    small(torch.randn(5, 6)).sum().backward()  # failed: shape '[8, -1]' is invalid for input of size 20
    assert small[2].in_features == 4
    assert all(torch.equal(a, b) for a, b in zip(sums, pruner.scorer._sums))
    model(torch.randn(5, 6))  # the pruner still watches the model itself
    assert not all(torch.equal(a, b) for a, b in zip(sums, pruner.scorer._sums))


def test_chains_with_any_elementwise_activation_dropout_or_a_final_log_softmax_shrink_to_the_masked_outputs():
    """ELU, Softplus, Dropout2d, a trailing LogSoftmax (for NLLLoss) and the like act on each channel alone, yet the
    chain reader refused them and asked for a channel_groups method."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ELU(), nn.Dropout2d(0.1), nn.Conv2d(8, 8, 3), nn.Softplus(),
                          nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.Linear(32, 16), nn.Mish(), nn.Hardswish(),
                          nn.AlphaDropout(0.1), nn.Linear(16, 12), nn.ReLU6(), nn.Linear(12, 4), nn.LogSoftmax(dim=1))
    for mode in ("filters", "neurons"):
        pruner = pruned(model, mode, 0.5)
        model.eval()
        small = shrink(model, pruner.layout.groups, live_channels(model, pruner.layout.groups)).eval()
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)
        assert param_count(small) < param_count(model)


class ResidualSequential(nn.Sequential):
    def forward(self, x):
        return x + super().forward(x)


def shared_weight():
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 3))
    model[4].weight = model[2].weight
    return model


def shared_layer():
    layer = nn.Linear(16, 16)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), layer, nn.ReLU(), layer, nn.Linear(16, 3))


@pytest.mark.parametrize("model, why", [
    (lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), Residual(), nn.Linear(16, 3)), "(Residual)"),
    (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(128, 3)),
     "(Conv2d(groups=2))"),
    (lambda: nn.Sequential(nn.Linear(12, 16), ResidualSequential(nn.Linear(16, 16), nn.ReLU()), nn.Linear(16, 3)),
     "(ResidualSequential)"),
    (shared_layer, "(module 2 = 4 used twice)"),
    (shared_weight, "(parameter 2.weight = 4.weight used twice)"),
], ids=["residual-block", "grouped-conv", "sequential-with-its-own-forward", "layer-used-twice", "weight-shared"])
def test_a_chain_the_reader_cannot_follow_is_refused_before_training(model, why):
    """Read as a plain chain, a residual block, a grouped conv or a layer used twice trained fine and then failed to shrink."""
    from patcli.engine.structure import StructureError

    mode = "filters" if "Conv" in why else "neurons"
    with pytest.raises(StructureError, match=rf"Sequential {re.escape(why)} needs a channel_groups\(kind\) method"):
        pruned(model(), mode, 0.5)


@pytest.mark.parametrize("flatten", [nn.Flatten(), nn.Flatten(start_dim=-3)], ids=["start-1", "start-minus-3"])
def test_a_flatten_of_a_convs_channels_and_positions_is_read_however_its_start_is_written(flatten):
    """Flatten(start_dim=-3) of (N, C, H, W) is Flatten(1): it was refused as if it left the channels alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), flatten, nn.Linear(32, 10))
    pruner = pruned(model, "filters", 0.5)
    small = shrink(model, pruner.layout.groups, live_channels(model, pruner.layout.groups))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))
    assert small[0].out_channels < 8


def test_pooling_over_a_convs_positions_after_a_flatten_that_keeps_its_channels_is_read():
    """Flatten(start_dim=2) keeps the channel axis: pooling after it is spatial, as before a Flatten."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Flatten(start_dim=2),
                          nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(6, 3))
    pruner = pruned(model, "filters", 0.5)
    small = shrink(model, pruner.layout.groups, live_channels(model, pruner.layout.groups))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))
    assert small[2].out_channels < 6 and param_count(small) < param_count(model)


def test_an_activation_module_used_twice_is_no_obstacle():
    """A shared ReLU holds nothing to cut: the chain still reads, and shrinks to the masked model's outputs."""
    relu = nn.ReLU()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), relu, nn.Linear(16, 16), relu, nn.Linear(16, 3))
    pruner = pruned(model, "neurons", 0.5)
    small = shrink(model, pruner.layout.groups, live_channels(model, pruner.layout.groups))
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))
    assert small[0].out_features < 16 and small[2].out_features < 16 and param_count(small) < param_count(model)


@pytest.mark.parametrize("mode, model, why", [
    ("neurons", lambda: nn.Sequential(nn.Unflatten(1, (8, 8)), nn.Linear(8, 6), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)),
     "1 (Linear) → 4 (Linear): the consumer takes 8× the Linear's outputs, flattened with its positions, not in blocks per neuron"),
    ("neurons", lambda: nn.Sequential(nn.Linear(12, 16), nn.Unflatten(1, (16, 1)), nn.Conv1d(16, 4, 1), nn.Flatten(), nn.Linear(4, 3)),
     "0 (Linear) → 2 (Conv1d): an Unflatten between them moves the channels"),
    ("filters", lambda: nn.Sequential(nn.Conv1d(1, 8, 3), nn.ReLU(), nn.Linear(8, 3)),  # on length 10: 8 positions
     "0 (Conv1d) → 2 (Linear): a Linear right after a conv acts on its last (spatial) axis, not on its channels; allowed: a Flatten"),
    # pooling mixes neighbouring neurons (masked and shrunk outputs differed by 0.19)
    ("neurons", lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.AvgPool1d(3, stride=1, padding=1), nn.Linear(16, 3)),
     "0 (Linear) → 3 (Linear): the AvgPool1d between them pools along the channel axis, mixing neighbouring channels"),
    ("filters", lambda: nn.Sequential(nn.Conv1d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.MaxPool1d(2), nn.Linear(32, 3)),
     "0 (Conv1d) → 4 (Linear): the MaxPool1d between them pools along the channel axis"),
    # a pool over more axes than the conv's positions takes the channels for one (masked and shrunk differed by 0.35)
    ("filters", lambda: nn.Sequential(nn.Conv2d(1, 8, 3), nn.MaxPool3d((2, 1, 1)), nn.Flatten(), nn.Linear(4 * 36, 3)),
     "0 (Conv2d) → 3 (Linear): the MaxPool3d between them pools over 3 axes of an output with 2 positional axes, so over the channels too"),
    ("filters", lambda: nn.Sequential(nn.Conv1d(1, 8, 3), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)),
     "0 (Conv1d) → 3 (Linear): the AvgPool2d between them pools over 2 axes of an output with 1 positional axis, so over the channels too"),
    # a Flatten that keeps the channel axis leaves the Linear reading positions (it shrank, then failed to run)
    ("filters", lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(start_dim=2), nn.AdaptiveAvgPool1d(8),
                                      nn.Linear(8, 3), nn.Flatten(), nn.Linear(12, 2)),
     "0 (Conv2d) → 4 (Linear): a Linear right after a conv acts on its last (spatial) axis, not on its channels; allowed: a Flatten of the "
     "channels and every position (start_dim=1)"),
    ("filters", lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(1, 2), nn.Linear(6, 3)),
     "0 (Conv2d) → 3 (Linear): a Linear right after a conv acts on its last (spatial) axis"),  # channels and rows merged, the Linear on columns
], ids=["linear-over-positions-then-flatten", "unflatten-between", "linear-on-a-conv-length", "pool-over-neurons",
        "pool-after-flatten", "pool-3d-after-conv2d", "pool-2d-after-conv1d", "linear-after-a-flatten-that-keeps-channels", "linear-after-a-flatten-of-channels-and-rows"])
def test_a_consumer_that_does_not_read_the_channels_where_the_reader_assumes_is_refused(mode, model, why):
    """Each trained with masks on the wrong input columns, then failed to shrink (or shrank to other outputs)."""
    from patcli.engine.structure import StructureError

    with pytest.raises(StructureError, match=f"^{re.escape(why)}"):
        pruned(model(), mode, 0.5)


def test_a_consumer_reading_a_number_of_inputs_that_is_no_multiple_of_the_channels_is_named_with_the_layer_kinds():
    """The message named the layers by their index alone: '3 takes 8 inputs, not a multiple of 0's 16 channels'."""
    from patcli.engine.structure import StructureError

    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.MaxPool1d(2), nn.Linear(8, 3))  # pools pairs of neurons
    with pytest.raises(StructureError, match=r"^3 \(Linear\) takes 8 inputs, not a multiple of the 16 channels of 0 "
                                             r"\(Linear\); allowed: .*channel_groups\(kind\)"):
        pruned(model, "neurons", 0.5)


def test_filter_pruning_turns_off_batchnorm_gamma_and_beta():
    model = model_of("cnn", DIGITS_META, channels=[8, 16, 16])
    randomise_norms(model)
    pruner = pruned(model, "filters", 0.6)
    bn = model[2]
    off = ~pruner.layout.group_keep[0]
    assert int(off.sum()) > 0 and bool((bn.weight[off] == 0).all()) and bool((bn.bias[off] == 0).all())


def test_heads_surgery_removes_heads_and_the_layer_reports_fewer():
    model = model_of("gpt", TEXT_META, n_layer=2, n_head=4, d_model=32)
    pruner = pruned(model, "heads", 0.5)
    small = shrink(model, pruner.layout.groups, live_channels(model, pruner.layout.groups))
    assert sum(block.attn.n_heads for block in small.blocks) == 4  # 8 heads, half removed
    assert pruner.sparsity() == pytest.approx(0.5)


def test_group_scorers_rank_channels_by_what_they_measure():
    model = model_of("mlp", DIGITS_META, hidden=[16])
    with torch.no_grad():  # neuron 3 is dead: no input weights, no bias
        model[1].weight[3].zero_()
        model[1].bias[3] = -5.0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner = Pruner(model, sparsity=0.1, schedule=SCHEDULES.get("oneshot")(begin=5), total_steps=10,
                    pattern=PATTERNS.get("neurons")(), scorer=SCORERS.get("activation")()).attach(optimizer)
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(torch.rand(32, 64)), torch.randint(0, 10, (32,))).backward()
        optimizer.step()
    (scores,) = pruner.scorer.group_scores()
    assert float(scores[3]) == 0.0 and float(scores.min()) == 0.0 and float(scores.max()) > 0.0

    gpt = model_of("gpt", TEXT_META, n_layer=1, n_head=4, d_model=32)
    with torch.no_grad():  # head 1 writes nothing: its output-projection columns are zero
        gpt.blocks[0].attn.out.weight[:, 8:16].zero_()
    for name in ("head_importance", "attention_entropy"):
        optimizer = torch.optim.SGD(gpt.parameters(), lr=0.0)
        pruner = Pruner(gpt, sparsity=0.25, schedule=SCHEDULES.get("oneshot")(begin=3), total_steps=5,
                        pattern=PATTERNS.get("heads")(), scorer=SCORERS.get(name)()).attach(optimizer)
        for _ in range(3):
            optimizer.zero_grad()
            tokens = torch.randint(0, 20, (4, 16))
            nn.functional.cross_entropy(gpt(tokens).reshape(-1, 20), tokens.reshape(-1)).backward()
            optimizer.step()
        (scores,) = pruner.scorer.group_scores()
        if name == "head_importance":
            assert float(scores[1]) == 0.0 and float(scores.min()) == 0.0 and bool((scores[[0, 2, 3]] > 0).all())
        else:  # minus the entropy: between -log(16) (uniform over 16 positions) and 0
            assert bool((scores <= 0).all()) and bool((scores >= -torch.log(torch.tensor(16.0))).all())
        pruner.detach()


def test_channel_scorers_need_a_channel_pattern():
    with pytest.raises(ValueError, match="pruning=neurons, filters or heads"):
        Pruner(model_of("mlp", DIGITS_META, hidden=[16]), sparsity=0.5, schedule=SCHEDULES.get("agp")(), total_steps=10,
               scorer=SCORERS.get("taylor")())


def test_compressed_format_round_trips_exactly_and_is_small_at_90_percent():
    torch.manual_seed(0)
    weight = torch.randn(512, 512)
    weight[torch.rand(512, 512) < 0.9] = 0
    state = {"w": weight, "b": torch.randn(512)}
    tensors, metadata = compress(state)
    back = decompress(tensors, metadata)
    assert torch.equal(back["w"], weight) and torch.equal(back["b"], state["b"])
    stored = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith("w::"))
    assert stored / (weight.numel() * 4) < 0.14


def test_text_dataset_loads_a_user_file_into_windows(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCLI_CACHE", str(tmp_path / "cache"))
    text = "def f(x):\n    return x + 1\n" * 200
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    data = load_dataset(NamedConfig("text", {"path": str(path), "block_size": 16, "max_vocab": 12}))
    assert data.task == "language_modeling" and data.meta["vocab_size"] == 12
    assert data.train.inputs.shape[1] == 16 and torch.equal(data.train.inputs[0, 1:], data.train.targets[0, :-1])
    windows = len(data.train) + len(data.val) + len(data.test)
    assert windows == pytest.approx(len(text) / 16, abs=3)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # cached after the first build
    (cached,) = (tmp_path / "cache").iterdir()
    cached.write_bytes(cached.read_bytes()[:50])  # damaged: it is rebuilt, not a traceback
    from patcli.data.base import _cached_load

    _cached_load.cache_clear()
    again = load_dataset(NamedConfig("text", {"path": str(path), "block_size": 16, "max_vocab": 12}))
    assert torch.equal(again.train.inputs, data.train.inputs) and cached.stat().st_size > 50


def test_text_dataset_ids_hold_vocabularies_beyond_int16(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCLI_CACHE", str(tmp_path / "cache"))
    text = "".join(chr(0x20000 + i) for i in range(40_000)) * 2  # 40,000 distinct CJK (extension B) characters
    path = tmp_path / "wide.txt"
    path.write_text(text, encoding="utf-8")
    data = load_dataset(NamedConfig("text", {"path": str(path), "block_size": 16, "max_vocab": 65536}))
    assert data.meta["vocab_size"] == 40_001  # the characters and the unknown id
    assert int(data.train.inputs.max()) > 32_767


def test_structured_pat_run_exports_a_smaller_model_that_loads_in_a_fresh_process(cli, tmp_path):
    code, out, err = cli("train", "model=cnn", "model.channels=[8,16,16]", "pruning=filters", "trainer.epochs=1",
                         f"hydra.run.dir={tmp_path}/run")
    assert code == 0, err
    run_dir = run_dir_of(out)
    record = result_of(run_dir)
    assert record["params_after"] < 0.6 * record["params_total"] and record["bytes_after"] < record["bytes_before"]
    assert {"batch1_before", "batch1_after", "batch64_before", "batch64_after"} <= set(record["latency_ms"])
    script = (
        "import sys, torch, patcli; from patcli.data import load_dataset; from patcli.config import NamedConfig\n"
        f"m = patcli.load_pruned({str(run_dir)!r})\n"
        "x = load_dataset(NamedConfig('digits', {})).val.inputs[:16]\n"
        "print(sum(p.numel() for p in m.parameters())); print(m(x).argmax(1).tolist())"
    )
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stderr
    params, predictions = fresh.stdout.strip().splitlines()
    assert int(params) == record["params_after"]
    from patcli.export import load_pruned

    x = load_dataset(NamedConfig("digits", {})).val.inputs[:16]
    assert json.loads(predictions) == load_pruned(run_dir)(x).argmax(1).tolist()
    import patcli

    on_cpu = patcli.load_pruned(run_dir, device="cpu")  # the device reaches the loader (cuda adds 2:4 kernels)
    assert json.loads(predictions) == on_cpu(x).argmax(1).tolist()
    assert {p.device.type for p in on_cpu.parameters()} == {"cpu"}


def test_export_command_compresses_an_unstructured_run(cli, tmp_path):
    code, out, _ = cli("train", "model.hidden=[64,64]", "trainer.epochs=1", "pruning.sparsity=0.9", f"hydra.run.dir={tmp_path}/u")
    assert code == 0
    code, out, err = cli("export", str(tmp_path / "u"))
    assert code == 0, err
    record = result_of(tmp_path / "u")
    assert record["bytes_after"] < 0.2 * record["bytes_before"]
    from patcli.export import load_pruned
    from safetensors.torch import load_file

    dense = load_file(str(tmp_path / "u" / "model.safetensors"))
    assert all(torch.equal(load_pruned(tmp_path / "u").state_dict()[k], v) for k, v in dense.items())
    code, _, err = cli("export", str(tmp_path / "missing"))
    assert code == 2 and "not a finished patcli run" in err
    (tmp_path / "u" / "result.json").write_text("{half a record")
    code, _, err = cli("export", str(tmp_path / "u"))
    assert code == 2 and err.startswith("error: RUN_DIR: ") and "not a readable record" in err
    (tmp_path / "u" / ".hydra" / "config.yaml").unlink()
    code, _, err = cli("export", str(tmp_path / "u"))
    assert code == 2 and err.startswith("error: RUN_DIR: ") and "no config snapshot (.hydra/config.yaml)" in err


def test_heads_run_on_a_text_file_reports_sparsity_over_the_attention_weights(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("PATCLI_CACHE", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_text("for i in range(10):\n    print(i * i)\n" * 300)
    code, out, err = cli("train", "model=gpt", "model.d_model=32", "model.n_head=4", "dataset=text",
                         f"dataset.path={tmp_path / 'corpus.txt'}", "dataset.block_size=16", "pruning=heads",
                         "allocation=uniform", "scorer=head_importance", "trainer.max_steps=30", "schedule.end=20",
                         "pruning.frequency=5", f"hydra.run.dir={tmp_path}/run")
    assert code == 0, err
    record = result_of(tmp_path / "run")
    assert record["achieved_sparsity"] == 0.5  # 4 of 8 heads: half of the Q/K/V/O weights
    assert record["primary_metric"] == "loss" and record["higher_is_better"] is False and "perplexity" in record["metrics"]["val"]
    per_head = 3 * (8 * 32 + 8) + 32 * 8  # Q/K/V rows with their biases, output-projection columns (head_dim 8)
    assert record["params_total"] - record["params_after"] == 2 * 2 * per_head  # 2 heads removed in each of 2 blocks


def test_nm_export_says_why_no_2_4_kernels_were_measured_without_a_gpu(cli, tmp_path):
    from patcli.engine.semi_structured import is_2_to_4

    code, _, err = cli("train", "model.hidden=[64,64]", "trainer.epochs=1", "pruning=nm", f"hydra.run.dir={tmp_path}/nm")
    assert code == 0, err
    code, _, err = cli("export", str(tmp_path / "nm"), "--no-latency")
    assert code == 0, err
    record = result_of(tmp_path / "nm")
    assert "no CUDA device" in record["extra"]["semi_structured"]
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "nm" / "model.safetensors"))
    assert is_2_to_4(weights["1.weight"]) and is_2_to_4(weights["3.weight"])
    assert not is_2_to_4(torch.ones(4, 8))


def test_a_relative_data_path_is_saved_absolute_so_export_works_from_elsewhere(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("PATCLI_CACHE", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_text("for i in range(10):\n    print(i * i)\n" * 100)
    code, _, err = cli("train", "model=gpt", "model.d_model=16", "model.n_head=2", "dataset=text", "dataset.path=corpus.txt",
                       "dataset.block_size=16", "trainer.max_steps=5", "pruning.sparsity=0.5", "hydra.run.dir=run")
    assert code == 0, err
    assert result_of(tmp_path / "run")["config"]["dataset"]["path"] == str(tmp_path / "corpus.txt")
    assert f"path: {tmp_path / 'corpus.txt'}" in (tmp_path / "run" / ".hydra" / "config.yaml").read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = cli("export", str(tmp_path / "run"), "--no-latency")
    assert code == 0 and out.splitlines()[-1] == f"export dir: {tmp_path / 'run' / 'export'}", err


def test_relative_paths_in_a_sweeps_list_are_made_absolute_too(tmp_path, monkeypatch):
    from patcli.hydra_app import absolute_paths

    monkeypatch.chdir(tmp_path)
    assert absolute_paths(["dataset.path=a.txt,/abs/b.txt", "dense=runs/d", "seed=0,1", "dataset.path='q.txt'"]) == [
        f"dataset.path='{tmp_path}/a.txt','/abs/b.txt'", f"dense='{tmp_path}/runs/d'", "seed=0,1", f"dataset.path='{tmp_path}/q.txt'"]
    assert absolute_paths(["dense=null", "trainer.init_from=null", "dense=null,runs/d"]) == [  # null is unset, not a file
        "dense=null", "trainer.init_from=null", f"dense=null,'{tmp_path}/runs/d'"]
    assert absolute_paths(["dense=d1, NULL", "dense=a,"]) == [f"dense='{tmp_path}/d1',NULL", "dense=a,"]  # as Hydra reads them


def test_an_export_folder_that_is_a_link_is_exported_through(cli, tmp_path):
    """A link made to keep exports on other storage: the export lands where it points, and loads."""
    import patcli

    code, _, err = cli("train", "model.hidden=[16]", "trainer.epochs=1", "pruning.sparsity=0.5", "hydra.run.dir=run")
    assert code == 0, err
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run" / "export").symlink_to(tmp_path / "elsewhere")
    for _ in range(2):  # and again, replacing the first
        code, _, err = cli("export", "run", "--no-latency")
        assert code == 0, err
    assert (tmp_path / "run" / "export").is_symlink()
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["compressed.safetensors", "model.json"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no partial folder left
    assert patcli.load_pruned(tmp_path / "run") is not None
    (tmp_path / "elsewhere" / "notes.txt").write_text("mine")  # the link's target is not patcli's: only its files go
    code, _, err = cli("export", "run", "--no-latency")
    assert code == 0 and (tmp_path / "elsewhere" / "notes.txt").read_text() == "mine", err
    (tmp_path / "run" / "export").unlink()
    (tmp_path / "run" / "export").write_text("a file")
    code, _, err = cli("export", "run", "--no-latency")
    assert code == 2 and err.strip() == "error: RUN_DIR: run/export is not a folder; allowed: a folder (or a link to one) for the export"


def test_a_target_whole_heads_cannot_meet_is_met_as_nearly_as_they_allow_and_the_run_log_says_so(cli, tmp_path):
    """16 heads: 0.3 lands on 5 of them (0.3125); it happened without a word."""
    code, out, err = cli("train", "model=gpt", "model.d_model=32", "model.n_head=8", "dataset=pysrc", "dataset.max_chars=200000",
                         "trainer.max_steps=5", "pruning=heads", "pruning.sparsity=0.3", "hydra.run.dir=run")
    assert code == 0, err
    record = result_of(tmp_path / "run")
    assert record["achieved_sparsity"] == pytest.approx(5 / 16)
    assert ("pruning=heads reached 0.3125 of the prunable weights for pruning.sparsity=0.3: the nearest that whole heads "
            "reach") in (tmp_path / "run" / "run.log").read_text()


def test_excluding_a_heads_k_or_v_weight_keeps_the_heads_of_that_layer():
    """Only a pattern matching Q excluded a block's heads: K and V were pruned with the rest, 25% zero."""
    model = model_of("gpt", TEXT_META, n_layer=2, n_head=4, d_model=32)
    pruner = pruned(model, "heads", 0.25, exclude=["blocks.0.attn.k.weight"])
    assert pruner.layout.layer_names == ["blocks.1.attn"]
    assert not bool((model.blocks[0].attn.k.weight == 0).any()) and bool((model.blocks[1].attn.k.weight == 0).any())


class InOutWeights(nn.Module):
    """Weights stored (in, out), as Hugging Face's GPT-2 Conv1D keeps them: a hidden neuron is a column of w1."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(12, 16)), nn.Parameter(torch.zeros(16))
        self.w2 = nn.Parameter(torch.randn(16, 3))

    def forward(self, x):
        return torch.relu(x @ self.w1 + self.b1) @ self.w2

    order = (0, 1, 2)  # the slices in any order: nothing asks for the producing weight first

    def channel_groups(self, kind):
        from patcli.engine.layouts import ChannelGroup, Slice

        slices = [Slice("w1", 1), Slice("b1", 0), Slice("w2", 0)]
        return [ChannelGroup("hidden", 16, [slices[i] for i in self.order], self.w1.shape)]


def test_a_layer_of_ones_own_is_named_by_the_weight_its_channels_are_cut_from_whatever_its_axis():
    """With (in, out) weights the classifier w2 is cut along dim 0: it was read as the layer's own weight, so
    excluding it (README's one exclude for every mode) left nothing to prune."""
    from patcli.engine.structure import channel_groups

    for order in ((0, 1, 2), (1, 0, 2), (2, 1, 0)):
        model = InOutWeights()
        model.order = order
        assert [g.name for g in channel_groups(model, "neurons", exclude=["w2"])] == ["hidden"], order
        assert channel_groups(model, "neurons", exclude=["w1"]) == [], order
        assert [g.name for g in channel_groups(model, "neurons", include=["w1"])] == ["hidden"], order


def test_a_regularizer_target_whole_heads_cannot_meet_is_said_in_the_run_log(cli, tmp_path):
    """Heads capped at 30% of each layer's 4 reach 25% at most; a 0.31 target rounds to that (within half a head)
    and the run ended 6 points under it without a word, as only runs without a regularizer were checked."""
    code, out, err = cli("train", "model=gpt", "model.d_model=32", "model.n_head=4", "dataset=pysrc", "dataset.max_chars=200000",
                         "trainer.max_steps=5", "pruning=heads", "pruning.max_layer_sparsity=0.3", "regularizer=group_lasso",
                         "regularizer.target=0.31", "hydra.run.dir=run")
    assert code == 0, err
    record = result_of(tmp_path / "run")
    assert record["achieved_sparsity"] == pytest.approx(0.25) and record["target_sparsity"] == 0.31
    assert ("pruning=heads reached 0.25 of the prunable weights for regularizer.target=0.31: the nearest that whole heads "
            "reach") in (tmp_path / "run" / "run.log").read_text()


def test_a_pruner_in_ones_own_loop_gives_the_smaller_model_it_pruned():
    """Users of the library had no documented way to the physically smaller model (only patcli export)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    pruner = neurons_pruned_by_activation(model)
    small = pruner.smaller_model()
    keep = dict(zip(pruner.masks.names, pruner.masks.keep))
    kept = [int(keep[name].any(dim=1).sum()) for name in ("0.weight", "2.weight")]
    assert kept[0] < 16 and kept[1] < 12
    assert (small[0].out_features, small[2].out_features, small[4].out_features) == (kept[0], kept[1], 3)
    assert param_count(small) == 6 * kept[0] + kept[0] + kept[0] * kept[1] + kept[1] + kept[1] * 3 + 3
    x = torch.randn(7, 6)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)
    assert small[0].weight.data_ptr() != model[0].weight.data_ptr()  # a copy: training the model goes on


def test_an_elementwise_pattern_has_no_smaller_model_and_says_what_to_use():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    pruner = pruned(model, "unstructured", 0.5)
    with pytest.raises(ValueError, match=r"^pattern 'unstructured' keeps every weight's shape; allowed: pattern="
                                         r"'neurons', 'filters' or 'heads'"):
        pruner.smaller_model()


def test_an_export_that_cannot_be_written_is_one_line_naming_the_export_folder(cli, tmp_path, monkeypatch):
    """A full disk ended `patcli export` in two chained tracebacks naming a temporary folder deleted right after."""
    import tempfile

    from safetensors import SafetensorError

    from patcli import runner
    from patcli.cli import Terminated

    code, _, _ = cli("train", "model.hidden=[16,16]", "trainer.epochs=1", f"hydra.run.dir={tmp_path}/u")
    assert code == 0

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(runner, "save_file", full)
    code, out, err = cli("export", str(tmp_path / "u"))
    assert code == 1 and "Traceback" not in err + out, err
    assert err.strip() == f"error: cannot write {tmp_path}/u/export: Error while serializing: IoError(Os {{ code: 28, kind: StorageFull }})"
    assert not (tmp_path / "u" / "export").exists() and not list((tmp_path / "u").glob(".export*"))

    def terminated(*args, **kwargs):  # SIGTERM, as the CLI takes it: it left .export.XXXX behind
        raise Terminated

    monkeypatch.setattr(runner, "save_file", terminated)
    code, out, err = cli("export", str(tmp_path / "u"))
    assert code == 143 and err.strip() == "error: interrupted (the older export and the record stay as they were)", err
    assert not list((tmp_path / "u").glob(".export*"))

    def read_only(*args, **kwargs):  # a run folder made read-only (an archived copy): a PermissionError traceback
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    code, out, err = cli("export", str(tmp_path / "u"))
    assert code == 1 and err.strip() == f"error: cannot write {tmp_path}/u/export: Permission denied", err


def test_latency_at_batch_64_is_timed_on_64_rows_when_validation_holds_fewer(cli, tmp_path, monkeypatch):
    """A small text file's 25 validation windows were timed and reported as batch 64."""
    from patcli import export

    monkeypatch.setenv("PATCLI_CACHE", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_text("for i in range(10):\n    print(i * i)\n" * 300)  # 540 validation characters
    code, _, err = cli("train", "model=gpt", "model.d_model=32", "model.n_head=4", "model.n_layer=1", "dataset=text",
                       f"dataset.path={tmp_path / 'corpus.txt'}", "dataset.block_size=16", "pruning=heads",
                       "trainer.max_steps=10", "pruning.frequency=5", f"hydra.run.dir={tmp_path}/run")
    assert code == 0, err
    timed = []
    measure = export.latency_ms
    monkeypatch.setattr(export, "latency_ms", lambda model, inputs, repeats: timed.append(len(inputs)) or measure(model, inputs, 1))
    code, _, err = cli("export", str(tmp_path / "run"))
    assert code == 0, err
    assert sorted(set(timed)) == [1, 64] and "batch64_before" in result_of(tmp_path / "run")["latency_ms"]


def gpt_of_two_blocks():
    return build_model(NamedConfig("gpt", {"n_layer": 2, "n_head": 4, "head_dim": 4, "d_model": 16}),
                       {"vocab_size": 11, "block_size": 8})


def kept_none_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "keeps no" in r.getMessage()]


def test_an_exclude_of_an_output_projection_says_it_keeps_no_head_and_which_weights_would(caplog):
    """Excluding a head's output projection left its heads pruned without a word."""
    model = gpt_of_two_blocks()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def build(*exclude, **settings):
        caplog.clear()
        Pruner(model, sparsity=0.5, schedule=SCHEDULES.get("oneshot")(), total_steps=1, pattern=PATTERNS.get("heads")(),
               exclude=list(exclude), **settings).attach(optimizer)
        return kept_none_warnings(caplog)

    assert build("blocks.0.attn.out.weight") == [
        "exclude pattern 'blocks.0.attn.out.weight' keeps no heads: the columns of blocks.0.attn.out.weight go with the heads "
        "of blocks.0.attn.k.weight, blocks.0.attn.q.weight, blocks.0.attn.v.weight, whose own weights it does not name "
        "(exclude those to keep these heads)"]
    assert build("blocks.0.attn.out.weight", "blocks.0.attn.k.weight") == []  # naming Q, K or V keeps the heads
    assert build("blocks.0.attn.out.weight", include=["blocks.1.*"]) == []  # those heads were not pruned anyway
    assert build("*.bias") == []  # a head's own biases are not another layer's columns
    with caplog.at_level("ERROR", logger="patcli.engine"):  # the engine's loggers, as README says, set as one
        assert build("blocks.0.attn.out.weight") == []


def test_an_exclude_of_the_layer_after_neurons_or_filters_is_not_warned_of(caplog):
    """The classifier excluded serves every mode of a sweep (unstructured keeps it dense)."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    Pruner(model, sparsity=0.5, schedule=SCHEDULES.get("oneshot")(), total_steps=1, pattern=PATTERNS.get("neurons")(),
           exclude=["4.weight"]).attach(torch.optim.SGD(model.parameters(), lr=0.1))
    assert kept_none_warnings(caplog) == []


def test_an_exclude_that_keeps_no_head_is_warned_once_in_the_run_log(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("PATCLI_CACHE", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_text("for i in range(10):\n    print(i * i)\n" * 100)
    code, _, err = cli("train", "model=gpt", "model.d_model=16", "model.n_head=2", "dataset=text", "dataset.path=corpus.txt",
                       "dataset.block_size=16", "trainer.max_steps=5", "pruning=heads", "pruning.sparsity=0.5",
                       "pruning.exclude=[blocks.0.attn.out.weight]", "hydra.run.dir=run")
    assert code == 0, err
    assert (tmp_path / "run" / "run.log").read_text().count("exclude pattern 'blocks.0.attn.out.weight' keeps no heads") == 1
