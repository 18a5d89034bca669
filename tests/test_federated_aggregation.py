"""Federated aggregation over FedDISC's parameter groups, and the round schedules."""
import copy
import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imer_fast.data import MODALITIES, make_synthetic
from imer_fast.federated import (CLASSIFIER, EXTRACTOR, EXTRACTOR_GROUPS, GENERATOR_GROUPS, AggregationError,
                                 AlternatingFrozenSchedule, ClientUpdate, Partition, PartitionRule, RoundPlan,
                                 SequentialSchedule, aggregate, feddisc_partition, generator_group, projection_group)
from imer_fast.train.feddisc import FedDISCConfig, build_model

# The release protocol: client 0 lacks audio, client 1 video, client 2 text.
RELEASE_CLIENTS = {"c0": frozenset({"text", "video"}), "c1": frozenset({"text", "audio"}),
                   "c2": frozenset({"video", "audio"})}
TEXT_GEN, AUDIO_GEN, VIDEO_GEN = "recovery.score_l_va.w", "recovery.score_a_lv.w", "recovery.score_v_la.w"


def tiny_global():
    """A state with one key per FedDISC rule kind (the real prefixes, tiny tensors)."""
    return {TEXT_GEN: torch.zeros(2), AUDIO_GEN: torch.zeros(2), VIDEO_GEN: torch.zeros(2),
            "recovery.proj_l.weight": torch.zeros(2), "dgn.w": torch.zeros(2, 1), "pseudo.w": torch.zeros(1),
            "classifier.w": torch.zeros(2),
            "recovery.latent_min": torch.full((3,), -1.0), "recovery.latent_max": torch.full((3,), 1.0),
            "recovery.scaling_fitted": torch.tensor(False)}


def tiny_update(client_id, offset, num_samples=1, modalities=None, **overrides):
    """Every key of tiny_global() filled with ``offset`` (+ position), then ``overrides``."""
    state = {k: (torch.arange(v.numel(), dtype=v.dtype).view(v.shape) + offset) if v.is_floating_point()
             else torch.tensor(True) for k, v in tiny_global().items()}
    state.update(overrides)
    return ClientUpdate(client_id, state, num_samples, modalities if modalities is not None
                        else RELEASE_CLIENTS[client_id])


def release_updates():
    return [tiny_update("c0", 10.0, 1), tiny_update("c1", 20.0, 3), tiny_update("c2", 40.0, 4)]


# ---- hand-computed means ---------------------------------------------------------------------


def test_generators_and_projections_average_over_their_holders_and_the_rest_over_all():
    result = aggregate(tiny_global(), release_updates(), feddisc_partition())
    s = result.state
    assert torch.equal(s[TEXT_GEN], torch.tensor([15.0, 16.0]))    # c0, c1 hold text
    assert torch.equal(s[AUDIO_GEN], torch.tensor([30.0, 31.0]))   # c1, c2 hold audio
    assert torch.equal(s[VIDEO_GEN], torch.tensor([25.0, 26.0]))   # c0, c2 hold video
    # the text projection: c2 (video + audio) never trains it, so its copy stays out of the mean
    assert torch.equal(s["recovery.proj_l.weight"], torch.tensor([15.0, 16.0]))
    assert result.report.groups[projection_group("text")].contributors == ("c0", "c1")
    assert torch.equal(s["classifier.w"], torch.tensor([70 / 3, 70 / 3 + 1], dtype=torch.float32))
    assert torch.equal(s["dgn.w"], torch.tensor([[70 / 3], [70 / 3 + 1]], dtype=torch.float32))
    assert bool(s["recovery.scaling_fitted"])
    report = result.report
    assert report.groups["generator:text"].contributors == ("c0", "c1")
    assert report.groups["generator:audio"].contributors == ("c1", "c2")
    assert report.groups[EXTRACTOR].contributors == ("c0", "c1", "c2")
    assert not any(g.kept_previous or g.weighted for g in report.groups.values())
    assert report.dropped == {}


def test_weighted_mean_uses_num_samples_and_zero_total_falls_back_to_unweighted():
    result = aggregate(tiny_global(), release_updates(), feddisc_partition(), weighted=True)
    assert torch.equal(result.state[TEXT_GEN], torch.tensor([(10 * 1 + 20 * 3) / 4, (11 * 1 + 21 * 3) / 4]))
    assert torch.equal(result.state["classifier.w"],
                       torch.tensor([(10 + 60 + 160) / 8, (11 + 63 + 164) / 8], dtype=torch.float32))
    assert result.report.groups[CLASSIFIER].weighted
    zero = [tiny_update("c0", 10.0, 0), tiny_update("c1", 20.0, 0), tiny_update("c2", 40.0, 0)]
    fallback = aggregate(tiny_global(), zero, feddisc_partition(), weighted=True)
    assert torch.equal(fallback.state["classifier.w"], aggregate(tiny_global(), zero, feddisc_partition())
                       .state["classifier.w"])
    assert not fallback.report.groups[CLASSIFIER].weighted


def test_means_accumulate_in_float64():
    tiny = 2.0 ** -24
    values = [1.0, tiny, tiny]
    updates = [tiny_update(f"c{i}", 0.0, modalities=frozenset(MODALITIES),
                           **{"classifier.w": torch.full((2,), v)}) for i, v in enumerate(values)]
    got = aggregate(tiny_global(), updates, feddisc_partition()).state["classifier.w"]
    expected = torch.tensor((1.0 + 2 * tiny) / 3, dtype=torch.float32)
    float32_mean = (torch.tensor(1.0) + tiny + tiny) / 3   # float32 accumulation in client order
    assert not torch.equal(expected, float32_mean)  # the inputs do tell the two accumulations apart
    assert torch.equal(got, expected.expand(2))


def test_aggregate_never_mutates_or_aliases_its_inputs():
    global_state, updates = tiny_global(), release_updates()
    before_global, before_updates = copy.deepcopy(global_state), copy.deepcopy([u.state for u in updates])
    result = aggregate(global_state, updates, feddisc_partition(), trainable={"classifier"}, weighted=True)
    for key, value in global_state.items():
        assert torch.equal(value, before_global[key]), key
    for update, before in zip(updates, before_updates):
        for key, value in update.state.items():
            assert torch.equal(value, before[key]), (update.client_id, key)
    inputs = {t.data_ptr() for t in global_state.values()} | {t.data_ptr() for u in updates for t in u.state.values()}
    assert not any(t.data_ptr() in inputs for t in result.state.values())
    assert list(result.state) == list(global_state)
    assert all(result.state[k].dtype == v.dtype and result.state[k].device == v.device for k, v in global_state.items())


def test_the_order_of_updates_does_not_change_a_bit():
    gen = torch.Generator().manual_seed(0)
    global_state = tiny_global()
    updates = []
    for i in range(5):
        state = {k: torch.randn(v.shape, generator=gen) * 10 ** i if v.is_floating_point() else torch.tensor(True)
                 for k, v in global_state.items()}
        modalities = frozenset(m for m in MODALITIES if torch.rand((), generator=gen) < 0.7)
        updates.append(ClientUpdate(f"client{i}", state, i * 7 + 1, modalities))
    for weighted in (False, True):
        first = aggregate(global_state, updates, feddisc_partition(), weighted=weighted).state
        for order in itertools.islice(itertools.permutations(updates), 1, None, 17):
            other = aggregate(global_state, list(order), feddisc_partition(), weighted=weighted).state
            for key in first:
                assert torch.equal(first[key], other[key]), (weighted, key)


def test_latent_ranges_combine_row_wise_over_each_modalitys_holders():
    ranges = {"c0": ([-2.0, -9.0, -1.5], [3.0, 9.0, 1.0]),    # holds text, video (its audio row is ignored)
              "c1": ([-1.0, -4.0, -7.0], [5.0, 2.0, 7.0]),    # holds text, audio
              "c2": ([-8.0, -3.0, -0.5], [8.0, 6.0, 2.5])}    # holds video, audio (its text row is ignored)
    updates = [tiny_update(cid, 0.0, **{"recovery.latent_min": torch.tensor(lo),
                                        "recovery.latent_max": torch.tensor(hi)})
               for cid, (lo, hi) in ranges.items()]
    state = aggregate(tiny_global(), updates, feddisc_partition()).state
    # rows in MODALITIES order: text (c0, c1), audio (c1, c2), video (c0, c2)
    assert torch.equal(state["recovery.latent_min"], torch.tensor([-2.0, -4.0, -1.5]))
    assert torch.equal(state["recovery.latent_max"], torch.tensor([5.0, 6.0, 2.5]))


def test_dgn_input_columns_average_over_their_modalitys_holders():
    key = "dgn.gru.weight_ih_l0_reverse"
    partition = feddisc_partition({"text": 2, "audio": 1, "video": 3})   # columns: audio | text text | video x3
    global_state = {**tiny_global(), key: torch.zeros(2, 6)}
    updates = [tiny_update(cid, offset, **{key: torch.full((2, 6), offset)})
               for cid, offset in (("c0", 10.0), ("c1", 20.0), ("c2", 40.0))]
    result = aggregate(global_state, updates, partition)
    assert torch.equal(result.state[key], torch.tensor([[30.0, 15.0, 15.0, 25.0, 25.0, 25.0]] * 2))
    assert result.report.groups[projection_group("audio")].contributors == ("c1", "c2")
    assert torch.equal(result.state["dgn.w"], aggregate(global_state, updates, feddisc_partition()).state["dgn.w"])
    # without the widths the whole tensor is the DGN's: averaged over every client
    assert torch.equal(aggregate(global_state, updates, feddisc_partition()).state[key], torch.full((2, 6), 70 / 3))
    # a frozen modality block keeps its global values while the others move
    only_text = aggregate(global_state, updates, partition, trainable={projection_group("text")}).state[key]
    assert torch.equal(only_text, torch.tensor([[0.0, 15.0, 15.0, 0.0, 0.0, 0.0]] * 2))


def test_scaling_fitted_is_the_and_of_its_contributors():
    updates = release_updates()[:2] + [tiny_update("c2", 40.0, **{"recovery.scaling_fitted": torch.tensor(False)})]
    assert not bool(aggregate(tiny_global(), updates, feddisc_partition()).state["recovery.scaling_fitted"])
    assert bool(aggregate(tiny_global(), updates[:2], feddisc_partition()).state["recovery.scaling_fitted"])


# ---- min_replies and frozen groups -------------------------------------------------------------


def test_a_modality_with_no_holder_keeps_its_previous_weights():
    global_state = {k: v + 0.123 if v.is_floating_point() else v for k, v in tiny_global().items()}
    updates = [tiny_update("c0", 10.0, modalities=frozenset({"text", "video"})),
               tiny_update("c1", 20.0, modalities=frozenset({"text"}))]
    result = aggregate(global_state, updates, feddisc_partition())
    assert torch.equal(result.state[AUDIO_GEN], global_state[AUDIO_GEN])
    assert result.state["recovery.latent_min"][1] == global_state["recovery.latent_min"][1]
    assert result.state["recovery.latent_max"][1] == global_state["recovery.latent_max"][1]
    assert result.report.groups["generator:audio"].contributors == ()
    assert result.report.groups["generator:audio"].kept_previous
    assert torch.equal(result.state[TEXT_GEN], torch.tensor([15.0, 16.0]))


def test_min_replies_keeps_groups_with_too_few_contributors():
    global_state = tiny_global()
    result = aggregate(global_state, release_updates(), feddisc_partition(), min_replies=3)
    for group in GENERATOR_GROUPS:   # two holders each
        assert result.report.groups[group].kept_previous
    for key in (TEXT_GEN, AUDIO_GEN, VIDEO_GEN, "recovery.latent_min", "recovery.latent_max",
                "recovery.scaling_fitted"):
        assert torch.equal(result.state[key], global_state[key]), key
    assert not result.report.groups[CLASSIFIER].kept_previous
    assert torch.equal(result.state["classifier.w"], torch.tensor([70 / 3, 70 / 3 + 1], dtype=torch.float32))


def test_frozen_groups_stay_bitwise_global_and_need_not_be_sent():
    global_state = {k: (torch.randn(v.shape) if v.is_floating_point() else v) for k, v in tiny_global().items()}
    full = tiny_update("x", 5.0, modalities=frozenset()).state
    sent = {k: v for k, v in full.items() if k.startswith(("recovery.score_", "recovery.latent_", "recovery.scaling_"))}
    updates = [ClientUpdate(cid, sent, 1, mods) for cid, mods in RELEASE_CLIENTS.items()]
    result = aggregate(global_state, updates, feddisc_partition(), trainable=set(GENERATOR_GROUPS))
    assert set(result.report.groups) == set(GENERATOR_GROUPS)
    for key in ("recovery.proj_l.weight", "dgn.w", "pseudo.w", "classifier.w"):
        assert torch.equal(result.state[key], global_state[key]), key
    assert torch.equal(result.state[TEXT_GEN], torch.tensor([5.0, 6.0]))


# ---- invalid updates ---------------------------------------------------------------------------

BAD_UPDATES = {
    "missing key": (lambda s: s.pop("classifier.w"), "classifier.w"),
    "extra key": (lambda s: s.update({"classifier.extra": torch.zeros(1)}), "classifier.extra"),
    "shape": (lambda s: s.update({"dgn.w": torch.zeros(1, 2)}), "dgn.w"),
    "dtype": (lambda s: s.update({"pseudo.w": torch.zeros(1, dtype=torch.float64)}), "pseudo.w"),
    "nan": (lambda s: s.update({VIDEO_GEN: torch.tensor([0.0, float("nan")])}), VIDEO_GEN),
    "inf": (lambda s: s.update({"recovery.latent_max": torch.tensor([1.0, float("inf"), 1.0])}),
            "recovery.latent_max"),
    "not a tensor": (lambda s: s.update({"classifier.w": [1.0, 2.0]}), "classifier.w"),
}


def bad_update(kind):
    update = tiny_update("c2", 40.0)
    edit, key = BAD_UPDATES[kind]
    edit(update.state)
    return update, key


@pytest.mark.parametrize("kind", sorted(BAD_UPDATES))
def test_invalid_updates_raise_naming_client_and_key_or_are_dropped(kind):
    good = release_updates()[:2]
    bad, key = bad_update(kind)
    with pytest.raises(AggregationError) as err:
        aggregate(tiny_global(), good + [bad], feddisc_partition())
    assert "'c2'" in str(err.value) and repr(key) in str(err.value), str(err.value)
    dropped = aggregate(tiny_global(), good + [bad], feddisc_partition(), on_invalid="drop")
    valid_only = aggregate(tiny_global(), good, feddisc_partition())
    assert list(dropped.report.dropped) == ["c2"] and repr(key) in dropped.report.dropped["c2"]
    assert dropped.report.groups == valid_only.report.groups
    for k, v in valid_only.state.items():
        assert torch.equal(dropped.state[k], v), k


def test_a_key_of_a_generator_the_client_lacks_is_not_required():
    state = tiny_update("c2", 40.0).state
    del state[TEXT_GEN]   # c2 lacks text: it never trains the text generator
    result = aggregate(tiny_global(), release_updates()[:2] + [ClientUpdate("c2", state, 1, RELEASE_CLIENTS["c2"])],
                       feddisc_partition())
    assert result.report.dropped == {} and result.report.groups["generator:text"].contributors == ("c0", "c1")


@pytest.mark.parametrize("num_samples", [-1, 1.5, True, None])
def test_a_bad_num_samples_raises_or_is_dropped(num_samples):
    bad = ClientUpdate("c2", tiny_update("c2", 40.0).state, num_samples, RELEASE_CLIENTS["c2"])
    with pytest.raises(AggregationError, match=r"client 'c2' num_samples must be an int >= 0"):
        aggregate(tiny_global(), release_updates()[:2] + [bad], feddisc_partition())
    dropped = aggregate(tiny_global(), release_updates()[:2] + [bad], feddisc_partition(), on_invalid="drop")
    assert list(dropped.report.dropped) == ["c2"]


def test_duplicate_client_ids_are_an_error_whatever_on_invalid():
    updates = release_updates() + [tiny_update("c1", 0.0)]
    for on_invalid in ("raise", "drop"):
        with pytest.raises(AggregationError, match=r"client id 'c1' appears in more than one update"):
            aggregate(tiny_global(), updates, feddisc_partition(), on_invalid=on_invalid)


@pytest.mark.parametrize("kwargs, message", [
    (dict(on_invalid="skip"), r"aggregate: on_invalid must be one of \('raise', 'drop'\); got 'skip'"),
    (dict(min_replies=0), r"aggregate: min_replies must be an int >= 1; got 0"),
    (dict(trainable={"generator:smell"}), r"aggregate: trainable names unknown groups \['generator:smell'\]"),
    (dict(trainable="classifier"), r"aggregate: trainable must be a set of group names"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(AggregationError, match=message):
        aggregate(tiny_global(), release_updates(), feddisc_partition(), **kwargs)


def test_global_state_keys_must_match_a_rule_and_suit_it():
    with pytest.raises(ValueError, match=r"key 'decoder.w' matches no rule"):
        aggregate({**tiny_global(), "decoder.w": torch.zeros(1)}, [], feddisc_partition())
    with pytest.raises(AggregationError, match=r"global_state\['recovery.latent_min'\] must have 3 rows"):
        aggregate({**tiny_global(), "recovery.latent_min": torch.zeros(2)}, [], feddisc_partition())
    with pytest.raises(AggregationError, match=r"global_state\['dgn.w'\] is torch.int64.*mean"):
        aggregate({**tiny_global(), "dgn.w": torch.zeros(2, 1, dtype=torch.long)}, [], feddisc_partition())
    with pytest.raises(AggregationError, match=r"global_state\['recovery.scaling_fitted'\] is torch.float32"):
        aggregate({**tiny_global(), "recovery.scaling_fitted": torch.zeros(())}, [], feddisc_partition())
    with pytest.raises(AggregationError, match=r"global_state\['dgn.lstm.weight_ih_l0'\] must have 6 columns "
                                               r"\(blocks \(1, 2, 3\)"):
        aggregate({**tiny_global(), "dgn.lstm.weight_ih_l0": torch.zeros(4, 5)}, [],
                  feddisc_partition({"text": 2, "audio": 1, "video": 3}))


def test_partition_and_update_construction_errors():
    with pytest.raises(ValueError, match=r"more than one rule for path\(s\) \['dgn'\]"):
        Partition((PartitionRule("dgn", EXTRACTOR), PartitionRule("dgn", CLASSIFIER)))
    with pytest.raises(ValueError, match=r"'dgn.w': columns must be one int width >= 0 per group \(2 groups\); "
                                         r"got \(3,\)"):
        PartitionRule("dgn.w", (EXTRACTOR, CLASSIFIER), columns=(3,))
    with pytest.raises(ValueError, match=r"'dgn.w': rowwise and columns are exclusive"):
        PartitionRule("dgn.w", (EXTRACTOR, CLASSIFIER), rowwise=True, columns=(1, 2))
    with pytest.raises(ValueError, match=r"feddisc_partition: feature_dims must map each of .* got \{'text': 4\}"):
        feddisc_partition({"text": 4})
    with pytest.raises(ValueError, match=r"group_modality names group 'generator:text' that no rule uses"):
        Partition((PartitionRule("dgn", EXTRACTOR),), {"generator:text": "text"})
    with pytest.raises(ValueError, match=r"combine must be one of"):
        PartitionRule("dgn", EXTRACTOR, combine="median")
    with pytest.raises(ValueError, match=r"client 'c9' modalities must be among .*\['smell'\]"):
        ClientUpdate("c9", {}, 1, frozenset({"text", "smell"}))
    with pytest.raises(ValueError, match=r"client 'c9' modalities must be a frozenset"):
        ClientUpdate("c9", {}, 1, "text")
    with pytest.raises(ValueError, match=r"generator_group: modality must be one of"):
        generator_group("t")


# ---- the real model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def feddisc_model():
    corpus = make_synthetic("iemocap6", scale=0.05, feature_dims={"text": 16, "audio": 12, "video": 8})
    return build_model(corpus, FedDISCConfig(preset="small"))


def test_a_key_belongs_to_the_most_specific_rule_whatever_the_order():
    rules = (PartitionRule("dgn", EXTRACTOR), PartitionRule("dgn.lstm", CLASSIFIER))
    for order in (rules, rules[::-1]):
        partition = Partition(order)
        assert partition.rule_for("dgn.lstm.weight_ih_l0").groups == (CLASSIFIER,)
        assert partition.rule_for("dgn.lstm_extra.w").groups == (EXTRACTOR,)   # a path prefix, not a module


def test_the_partition_classifies_every_key_of_a_real_model_as_its_stages_do(feddisc_model):
    partition = feddisc_partition(feddisc_model.feature_dims)
    rules = {k: partition.rule_for(k) for k in feddisc_model.state_dict()}
    group_of_parameter = {}
    for name, _ in feddisc_model.named_parameters():
        groups = rules[name].groups
        if rules[name].split:   # the DGN's input columns: one block per modality, trained with the extractor
            assert name.startswith("dgn.") and set(groups) == set(EXTRACTOR_GROUPS) - {EXTRACTOR}, name
            groups = (EXTRACTOR,)
        (group,) = groups
        group_of_parameter[name] = group
    names = {id(p): n for n, p in feddisc_model.named_parameters()}
    stage_groups = feddisc_model.parameter_groups()   # what the trainer freezes and trains together
    assert {group_of_parameter[names[id(p)]] for p in stage_groups["recovery"]} == set(GENERATOR_GROUPS)
    assert {group_of_parameter[names[id(p)]] for p in stage_groups["extractor"]} == set(EXTRACTOR_GROUPS)
    assert {group_of_parameter[names[id(p)]] for p in stage_groups["classifier"]} == {CLASSIFIER}
    assert sum(len(v) for v in stage_groups.values()) == len(group_of_parameter)
    for m in MODALITIES:   # each generator group holds exactly one U-Net
        prefixes = {name.split(".")[1] for name, g in group_of_parameter.items() if g == generator_group(m)}
        assert len(prefixes) == 1, (m, prefixes)


def test_three_release_clients_aggregate_a_real_model(feddisc_model):
    global_state = {k: v.clone() for k, v in feddisc_model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    states = {}
    for cid in RELEASE_CLIENTS:
        states[cid] = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point()
                       else torch.tensor(True) for k, v in global_state.items()}
    updates = [ClientUpdate(cid, states[cid], 10, mods) for cid, mods in RELEASE_CLIENTS.items()]
    state = aggregate(global_state, updates, feddisc_partition(feddisc_model.feature_dims)).state
    assert set(state) == set(global_state)

    def mean(key, clients):
        return (sum(states[c][key].double() for c in clients) / len(clients)).float()

    holders = {m: [c for c, mods in RELEASE_CLIENTS.items() if m in mods] for m in MODALITIES}
    generator_keys = {"text": "recovery.score_l_va", "audio": "recovery.score_a_lv", "video": "recovery.score_v_la"}
    for m, prefix in generator_keys.items():
        keys = sorted(k for k in global_state if k.startswith(prefix + "."))
        for key in (keys[0], keys[len(keys) // 2], keys[-1]):
            assert torch.equal(state[key], mean(key, holders[m])), key
    projection_keys = {"text": "recovery.proj_l.", "audio": "recovery.proj_a.", "video": "recovery.proj_v."}
    for m, prefix in projection_keys.items():
        for key in (k for k in global_state if k.startswith(prefix)):
            assert torch.equal(state[key], mean(key, holders[m])), key
    input_columns = [f"dgn.{rnn}.weight_ih_l0{d}" for rnn in ("lstm", "gru") for d in ("", "_reverse")]
    shared = [k for k in global_state if k.startswith(("dgn.", "pseudo.", "classifier.")) and k not in input_columns]
    for key in shared[::max(1, len(shared) // 7)] + ["dgn.lstm.weight_hh_l0", "dgn.lstm.weight_ih_l1"]:
        assert torch.equal(state[key], mean(key, list(RELEASE_CLIENTS))), key
    blocks = {"audio": slice(0, 12), "text": slice(12, 28), "video": slice(28, 36)}   # GCNet's concatenation order
    for key in input_columns:
        assert state[key].shape[1] == 36, key
        for m, columns in blocks.items():
            assert torch.equal(state[key][:, columns], mean(key, holders[m])[:, columns]), (key, m)
    for i, m in enumerate(MODALITIES):
        assert state["recovery.latent_min"][i] == min(states[c]["recovery.latent_min"][i] for c in holders[m])
        assert state["recovery.latent_max"][i] == max(states[c]["recovery.latent_max"][i] for c in holders[m])
    assert bool(state["recovery.scaling_fitted"])
    feddisc_model.load_state_dict(state)   # the broadcast is a complete, loadable state


@pytest.mark.parametrize("phase", ["extractor", "recovery", "classifier"])
def test_replies_trimmed_to_reply_keys_aggregate_bitwise_as_whole_states(feddisc_model, phase):
    from imer_fast.federated.schedule import PHASE_GROUPS

    partition, trainable = feddisc_partition(feddisc_model.feature_dims), PHASE_GROUPS[phase]
    global_state = {k: v.clone() for k, v in feddisc_model.state_dict().items()}
    gen = torch.Generator().manual_seed(2)
    whole, trimmed, sent = [], [], {}
    for cid, mods in RELEASE_CLIENTS.items():
        state = {k: v + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
                 for k, v in global_state.items()}
        sent[cid] = partition.reply_keys(state, trainable, mods)
        whole.append(ClientUpdate(cid, state, 5, mods))
        trimmed.append(ClientUpdate(cid, {k: state[k] for k in sent[cid]}, 5, mods))
    expected = aggregate(global_state, whole, partition, trainable=trainable).state
    got = aggregate(global_state, trimmed, partition, trainable=trainable).state
    assert all(torch.equal(got[k], expected[k]) for k in global_state)
    # what is sent: the trainable groups the client holds, nothing else
    gen_prefix = {"text": "recovery.score_l_va.", "audio": "recovery.score_a_lv.", "video": "recovery.score_v_la."}
    for cid, mods in RELEASE_CLIENTS.items():
        keys = set(sent[cid])
        assert keys, cid
        for m, prefix in gen_prefix.items():
            expected_in = phase == "recovery" and m in mods
            assert any(k.startswith(prefix) for k in keys) == expected_in, (cid, m)
        assert any(k.startswith("classifier.") for k in keys) == (phase == "classifier")
        assert any(k.startswith(("dgn.", "pseudo.")) for k in keys) == (phase == "extractor")
        assert ("recovery.scaling_fitted" in keys) == (phase == "recovery")


# ---- fuzzing against a reference ---------------------------------------------------------------

FUZZ_KEYS = {"recovery.score_l_va.w": "text", "recovery.score_a_lv.w": "audio", "recovery.score_v_la.w": "video",
             "recovery.proj_a.w": None, "classifier.w": None}


def reference_aggregate(global_state, clients, trainable, weighted, min_replies):
    """Element-wise numpy reference: clients = [(id, {key: array}, num_samples, modalities)]."""
    out = {}
    clients = sorted(clients, key=lambda c: c[0])
    for key, previous in global_state.items():
        modality = FUZZ_KEYS[key]
        group = generator_group(modality) if modality else (CLASSIFIER if key.startswith("classifier") else EXTRACTOR)
        entitled = [c for c in clients if modality is None or modality in c[3]]
        if group not in trainable or len(entitled) < min_replies:
            out[key] = previous
            continue
        weights = [c[2] for c in entitled] if weighted and sum(c[2] for c in entitled) > 0 else [1] * len(entitled)
        acc = np.zeros(previous.shape, dtype=np.float64)
        for c, w in zip(entitled, weights):
            acc += c[1][key].astype(np.float64) * w
        out[key] = (acc / sum(weights)).astype(np.float32)
    return out


def normal(rng, shape, scale):
    """float32 N(0, scale²) array of ``shape`` (a 0-d array, not a numpy scalar, for shape ())."""
    return np.asarray(rng.standard_normal(shape) * scale).astype(np.float32)


@st.composite
def fuzz_rounds(draw):
    shapes = {k: tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))) for k in FUZZ_KEYS}
    n_clients = draw(st.integers(0, 5))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    rng = np.random.default_rng(seed)
    global_state = {k: normal(rng, shape, 1.0) for k, shape in shapes.items()}
    clients = []
    for i in range(n_clients):
        modalities = frozenset(draw(st.sets(st.sampled_from(MODALITIES))))
        scale = 10.0 ** draw(st.integers(-3, 3))
        state = {k: normal(rng, shape, scale) for k, shape in shapes.items()}
        clients.append((f"client{draw(st.integers(0, 99)):02d}-{i}", state, draw(st.integers(0, 50)), modalities))
    groups = sorted({EXTRACTOR, CLASSIFIER, *GENERATOR_GROUPS})
    trainable = frozenset(draw(st.sets(st.sampled_from(groups), min_size=1)))
    return global_state, clients, trainable, draw(st.booleans()), draw(st.integers(1, 3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_rounds())
def test_aggregate_matches_a_reference_on_random_rounds(round_):
    global_state, clients, trainable, weighted, min_replies = round_
    partition = Partition(tuple(PartitionRule(k[:-2], generator_group(m) if m else
                                              (CLASSIFIER if k.startswith("classifier") else EXTRACTOR))
                                for k, m in FUZZ_KEYS.items()),
                          {generator_group(m): m for m in MODALITIES})
    updates = [ClientUpdate(cid, {k: torch.from_numpy(v) for k, v in state.items()}, n, mods)
               for cid, state, n, mods in clients]
    got = aggregate({k: torch.from_numpy(v) for k, v in global_state.items()}, updates[::-1], partition,
                    trainable=trainable, weighted=weighted, min_replies=min_replies).state
    expected = reference_aggregate(global_state, clients, trainable, weighted, min_replies)
    for key, value in expected.items():
        assert torch.equal(got[key], torch.from_numpy(np.asarray(value, dtype=np.float32))), key


# ---- schedules ---------------------------------------------------------------------------------

EXTRACT, RECOVER, CLASSIFY = (RoundPlan("extractor", frozenset(EXTRACTOR_GROUPS)),
                              RoundPlan("recovery", frozenset(GENERATOR_GROUPS)),
                              RoundPlan("classifier", frozenset({CLASSIFIER})))


def plans(schedule):
    return [schedule.plan(r) for r in range(1, schedule.total_rounds + 1)]


def test_alternating_frozen_schedule_phases():
    schedule = AlternatingFrozenSchedule(extractor_rounds=2, recovery_rounds=1, classifier_rounds=2, cycles=2)
    assert schedule.total_rounds == 8
    assert plans(schedule) == [EXTRACT, EXTRACT, RECOVER, CLASSIFY, CLASSIFY, RECOVER, CLASSIFY, CLASSIFY]
    assert plans(AlternatingFrozenSchedule(0, 2, 0, 2)) == [RECOVER] * 4
    assert plans(AlternatingFrozenSchedule(1, 3, 3, 0)) == [EXTRACT]


def test_sequential_schedule_is_one_pass_of_the_release_stages():
    schedule = SequentialSchedule(extractor_rounds=1, generator_rounds=2, classifier_rounds=3)
    assert schedule.total_rounds == 6
    assert plans(schedule) == [EXTRACT, RECOVER, RECOVER, CLASSIFY, CLASSIFY, CLASSIFY]
    assert plans(SequentialSchedule(0, 0, 1)) == [CLASSIFY]


@pytest.mark.parametrize("make, message", [
    (lambda: AlternatingFrozenSchedule(1, -1, 1, 1),
     r"AlternatingFrozenSchedule: recovery_rounds must be an int >= 0; got -1"),
    (lambda: AlternatingFrozenSchedule(1, 1, 1, 1.0),
     r"AlternatingFrozenSchedule: cycles must be an int >= 0; got 1.0"),
    (lambda: AlternatingFrozenSchedule(0, 3, 3, 0),
     r"AlternatingFrozenSchedule: the schedule must have at least one round"),
    (lambda: SequentialSchedule(True, 1, 1), r"SequentialSchedule: extractor_rounds must be an int >= 0; got True"),
    (lambda: SequentialSchedule(0, 0, 0), r"SequentialSchedule: the schedule must have at least one round"),
])
def test_schedule_arguments_are_checked(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("round_number", [0, 7, -1, 1.0])
def test_rounds_outside_the_schedule_are_errors(round_number):
    with pytest.raises(ValueError, match=r"SequentialSchedule.plan: round_number must be"):
        SequentialSchedule(1, 2, 3).plan(round_number)
