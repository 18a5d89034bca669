"""Staged trainer: freezing, early stopping, best-weight restore, atomic checkpoints, exact resume."""
import json
import warnings

import pytest
import torch
from torch import nn

from imer_fast.data import make_synthetic
from imer_fast.train.trainer import Stage, Trainer, TrainerConfig, with_validation


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 1)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.b(self.drop(torch.relu(self.a(x))))


def make_stages(model, crash_in=None, epochs=3):
    data = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)).to(next(model.parameters()).device)
    target = data.sum(1, keepdim=True)

    def batches(epoch):
        order = torch.randperm(64)  # the global RNG: restored on resume
        return [order[i:i + 16] for i in range(0, 64, 16)]

    def step(name):
        def run(idx, epoch):
            if crash_in == (name, epoch):
                raise KeyboardInterrupt("simulated crash")
            return ((model(data[idx]) - target[idx]) ** 2).mean(), len(idx)
        return run

    def validate():
        return {"loss": float(((model(data) - target) ** 2).mean())}

    groups = {"a": list(model.a.parameters()), "b": list(model.b.parameters())}
    return [Stage(name, name[0], epochs, groups[name[0]], step(name), validate, batches, train_modules=[model])
            for name in ("a1", "b1", "a2")]


def test_stages_train_only_their_group():
    torch.manual_seed(0)
    model = Toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stages = make_stages(model)[:1]
    Trainer(model, stages, TrainerConfig(progress=False, lr=1e-2)).run()
    after = model.state_dict()
    assert not torch.equal(before["a.weight"], after["a.weight"])
    assert torch.equal(before["b.weight"], after["b.weight"])


def test_crash_then_resume_equals_an_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    model = Toy()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer(model, make_stages(model), TrainerConfig(progress=False, lr=1e-2, out_dir=str(tmp_path / "full"))).run()
    expected = model.state_dict()

    crashed = Toy()
    crashed.load_state_dict(init)
    cfg = TrainerConfig(progress=False, lr=1e-2, out_dir=str(tmp_path / "crash"))
    with pytest.raises(KeyboardInterrupt):
        Trainer(crashed, make_stages(crashed, crash_in=("b1", 1)), cfg).run()
    metrics = json.loads((tmp_path / "crash" / "metrics.json").read_text())
    assert [(e["stage"], e["epoch"]) for e in metrics["history"]] == [("a1", 1), ("a1", 2), ("a1", 3), ("b1", 1)]
    resumed = Toy()  # a fresh process: weights come from the checkpoint
    cfg.resume = True
    history = Trainer(resumed, make_stages(resumed), cfg).run()
    assert len(history) == 9
    for k, v in expected.items():
        assert torch.equal(resumed.state_dict()[k], v), k


@pytest.mark.gpu
def test_resume_on_cuda_restores_the_cpu_generator_states(tmp_path):
    """The checkpoint is loaded with map_location = the run's device, which moves the saved RNG states
    to the GPU; torch.set_rng_state only takes CPU ByteTensors."""
    torch.manual_seed(0)
    crashed = Toy().cuda()
    init = {k: v.clone() for k, v in crashed.state_dict().items()}
    cfg = TrainerConfig(progress=False, lr=1e-2, out_dir=str(tmp_path), device="cuda")
    with pytest.raises(KeyboardInterrupt):
        Trainer(crashed, make_stages(crashed, crash_in=("b1", 1)), cfg).run()
    resumed = Toy().cuda()
    resumed.load_state_dict(init)
    cfg.resume = True
    assert len(Trainer(resumed, make_stages(resumed), cfg).run()) == 9


def test_early_stopping_restores_the_best_epoch():
    torch.manual_seed(0)
    model = Toy()
    values = iter([1.0, 0.5, 0.7, 0.9, 0.2])
    snapshots = []

    def validate():
        snapshots.append(model.a.weight.detach().clone())
        return {"loss": next(values)}

    stage = make_stages(model, epochs=5)[0]
    stage.validate = validate
    history = Trainer(model, [stage], TrainerConfig(progress=False, lr=1e-2, patience=2)).run()
    assert len(history) == 4  # epochs 3 and 4 did not improve on epoch 2
    assert torch.equal(model.a.weight, snapshots[1])


def _scripted_run(values, epochs, patience, **config):
    torch.manual_seed(0)
    model = Toy()
    values, snapshots = iter(values), []

    def validate():
        snapshots.append(model.a.weight.detach().clone())
        return {"loss": next(values)}

    stage = make_stages(model, epochs=epochs)[0]
    stage.validate = validate
    history = Trainer(model, [stage], TrainerConfig(progress=False, lr=1e-2, patience=patience, **config)).run()
    return model, history, snapshots


def test_a_non_finite_validation_value_never_becomes_the_best():
    nan = float("nan")
    model, history, snapshots = _scripted_run([nan, 0.5, 0.4, 0.3, nan, nan, nan, 0.35], epochs=8, patience=3,
                                              lr_patience=0)
    assert len(history) == 7  # the NaN epochs after the best (0.3, epoch 4) are bad epochs
    assert torch.equal(model.a.weight, snapshots[3])
    # NaN is no plateau: with lr_patience 0 any stepped non-improvement would cut the rate at once
    assert [h["lr"] for h in history] == [1e-2] * 7


def test_a_stage_with_nothing_to_validate_runs_all_its_epochs_and_keeps_the_last_weights(tmp_path):
    model, history, snapshots = _scripted_run([float("nan")] * 5, epochs=5, patience=2, out_dir=str(tmp_path))
    assert len(history) == 5
    assert not torch.equal(model.a.weight, snapshots[0])
    json.loads((tmp_path / "metrics.json").read_text(), parse_constant=pytest.fail)  # strict JSON: null, no NaN
    assert json.loads((tmp_path / "metrics.json").read_text())["history"][0]["valid"]["loss"] is None


def test_an_epoch_that_trains_nothing_warns_and_records_no_loss(tmp_path):
    torch.manual_seed(0)
    model = Toy()
    stage = make_stages(model, epochs=2)[0]
    stage.train_step = lambda batch, epoch: (None, 0)  # every batch skipped (e.g. all its utterances missing)
    with pytest.warns(RuntimeWarning, match=r"stage 'a1' epoch [12] trained nothing: all 4 batches were skipped"):
        history = Trainer(model, [stage], TrainerConfig(progress=True, lr=1e-2, out_dir=str(tmp_path))).run()
    assert [h["train_loss"] for h in history] == [None, None]
    assert [h["skipped_batches"] for h in history] == [4, 4]


def test_an_update_stage_that_steps_but_logs_no_loss_is_not_called_skipped():
    model = Toy()
    stage = make_update_stage(model, [], epochs=1)

    def train_step(idx, epoch, update):
        update("a", ((model(idx.float()[:, None].repeat(1, 4)) - 1) ** 2).mean())
        return None, 1  # the docstring allows "loss to log or None"

    stage.train_step = train_step
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        history = Trainer(model, [stage], TrainerConfig(progress=False, lr=1e-2)).run()
    assert history[0]["skipped_batches"] == 0 and history[0]["train_loss"] is None


def test_resume_does_not_reopen_a_stage_that_stopped_early(tmp_path, monkeypatch):
    import imer_fast.train.trainer as trainer_module

    def stages(model):
        out = make_stages(model, epochs=6)[:2]
        values = iter([1.0, 2.0, 2.0] + [0.5] * 100)  # a1: best at epoch 1, stops after epoch 3 (patience 2)
        out[0].validate = lambda: {"loss": next(values)}
        return out

    torch.manual_seed(0)
    model = Toy()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    full = Trainer(model, stages(model), TrainerConfig(progress=False, lr=1e-2, patience=2)).run()
    # the process dies while writing the checkpoint that moves on to b1 (the 4th write)
    real, writes = trainer_module.atomic_torch_save, []

    def dies_on_the_fourth_write(path, obj):
        writes.append(path)
        if len(writes) == 4:
            raise KeyboardInterrupt("simulated crash")
        return real(path, obj)

    monkeypatch.setattr(trainer_module, "atomic_torch_save", dies_on_the_fourth_write)
    crashed = Toy()
    crashed.load_state_dict(init)
    cfg = TrainerConfig(progress=False, lr=1e-2, patience=2, out_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        Trainer(crashed, stages(crashed), cfg).run()
    monkeypatch.setattr(trainer_module, "atomic_torch_save", real)
    resumed = Toy()
    cfg.resume = True
    history = Trainer(resumed, stages(resumed), cfg).run()
    assert [(e["stage"], e["epoch"]) for e in history] == [(e["stage"], e["epoch"]) for e in full]
    assert [(e["stage"], e["epoch"]) for e in history][:4] == [("a1", 1), ("a1", 2), ("a1", 3), ("b1", 1)]


def test_extra_state_such_as_a_runs_skip_count_survives_a_resume(tmp_path):
    from imer_fast.train.run import SystemRun

    class Config:  # what SystemRun reads
        trainer = TrainerConfig()

    def run_with(model, crash_in=None):
        counting = SystemRun(model, None, Config())
        stages = make_stages(model, crash_in=crash_in)
        for stage in stages:
            step = stage.train_step

            def counted(idx, epoch, step=step):
                counting.skipped_utterances += 1  # e.g. all-missing utterances left out of a batch
                return step(idx, epoch)
            stage.train_step = counted
        return counting, stages

    torch.manual_seed(0)
    model = Toy()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    full, stages = run_with(model)
    Trainer(model, stages, TrainerConfig(progress=False), extra_state=full.state).run()
    crashed = Toy()
    crashed.load_state_dict(init)
    counting, stages = run_with(crashed, crash_in=("b1", 1))
    cfg = TrainerConfig(progress=False, out_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        Trainer(crashed, stages, cfg, extra_state=counting.state).run()
    resumed = Toy()
    counting, stages = run_with(resumed)  # a fresh process
    cfg.resume = True
    Trainer(resumed, stages, cfg, extra_state=counting.state).run()
    assert counting.skipped_utterances == full.skipped_utterances == 9 * 4  # 9 epochs of 4 batches


def test_plateau_schedule_follows_a_lower_is_better_monitor_without_a_loss():
    torch.manual_seed(0)
    model = Toy()
    stage = make_stages(model, epochs=6)[0]
    improving = iter([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    stage.validate = lambda: {"mae": next(improving)}
    stage.monitor, stage.mode = "mae", "min"
    history = Trainer(model, [stage], TrainerConfig(progress=False, lr=1e-2, lr_patience=1, patience=99)).run()
    assert [e["lr"] for e in history] == [1e-2] * 6  # never cut while the metric improves
    worsening = iter([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])  # an accuracy falling: mode "max"
    stage = make_stages(model, epochs=6)[0]
    stage.validate = lambda: {"acc": next(worsening)}
    stage.monitor, stage.mode = "acc", "max"
    history = Trainer(model, [stage], TrainerConfig(progress=False, lr=1e-2, lr_patience=1, patience=99)).run()
    assert history[-1]["lr"] < 1e-2


@pytest.mark.parametrize("field, value", [("patience", 0), ("patience", -1), ("lr_patience", -1), ("patience", 1.5),
                                          ("grad_clip", -1.0), ("grad_clip", float("nan"))])
def test_trainer_settings_out_of_range_are_refused(field, value):
    model = Toy()
    with pytest.raises(ValueError, match=f"Trainer: {field} must be an? (int|number|finite number)"):
        Trainer(model, make_stages(model), TrainerConfig(progress=False, **{field: value}))
    config = TrainerConfig(progress=False)
    setattr(config, field, value)   # set after the config was built: the trainer checks again
    with pytest.raises(ValueError, match=f"Trainer: {field} must be"):
        Trainer(model, make_stages(model), config)


def test_resume_from_an_unusable_checkpoint_names_it(tmp_path):
    model = Toy()
    stages = make_stages(model, epochs=1)
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="Trainer: cannot resume: .*checkpoint.pt is not a readable checkpoint"):
        Trainer(model, stages, TrainerConfig(progress=False, out_dir=str(tmp_path), resume=True)).run()
    torch.save({"a.weight": torch.zeros(1)}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="not a trainer checkpoint"):
        Trainer(model, stages, TrainerConfig(progress=False, out_dir=str(tmp_path), resume=True)).run()
    Trainer(model, stages, TrainerConfig(progress=False, out_dir=str(tmp_path))).run()
    wider = Toy()
    wider.a = nn.Linear(4, 8)
    wider.b = nn.Linear(8, 1)
    with pytest.raises(ValueError, match="does not fit this model .*size mismatch for a.weight"):
        Trainer(wider, make_stages(wider, epochs=1), TrainerConfig(progress=False, out_dir=str(tmp_path),
                                                                   resume=True)).run()


def test_resume_refuses_other_settings(tmp_path):
    model = Toy()
    settings = {"seed": 0, "missing": "gcnet:0.3", "trainer": {"lr": 1e-3}}
    Trainer(model, make_stages(model, epochs=1), TrainerConfig(progress=False, out_dir=str(tmp_path)),
            settings=settings).run()
    other = dict(settings, missing="gcnet:0.5")
    with pytest.raises(ValueError, match=r"other settings \(missing: 'gcnet:0.3' -> 'gcnet:0.5'\)"):
        Trainer(model, make_stages(model, epochs=1), TrainerConfig(progress=False, out_dir=str(tmp_path),
                                                                   resume=True), settings=other).run()
    Trainer(model, make_stages(model, epochs=1), TrainerConfig(progress=False, out_dir=str(tmp_path), resume=True),
            settings=dict(settings)).run()  # the same settings resume


def test_resume_refuses_a_checkpoint_of_another_schedule(tmp_path):
    model = Toy()
    Trainer(model, make_stages(model, epochs=1)[:1], TrainerConfig(progress=False, out_dir=str(tmp_path))).run()
    with pytest.raises(ValueError, match="different schedule"):
        Trainer(model, make_stages(model, epochs=1), TrainerConfig(progress=False, out_dir=str(tmp_path),
                                                                   resume=True)).run()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(model, make_stages(model), TrainerConfig(progress=False, out_dir=str(tmp_path / "x"),
                                                         resume=True)).run()


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path):
    model = Toy()
    stages = make_stages(model, epochs=2)[:1]
    good = stages[0].train_step
    stages[0].train_step = lambda idx, epoch: (good(idx, epoch)[0] * (float("nan") if epoch == 1 else 1.0), 1)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        Trainer(model, stages, TrainerConfig(progress=False, out_dir=str(tmp_path))).run()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["position"]["epoch"] == 1


def test_with_validation_holds_out_training_dialogues():
    corpus = make_synthetic("iemocap6", seed=0, scale=0.1, feature_dims=8)
    split = with_validation(corpus, 0.2, seed=1)
    assert split.splits["valid"] and not set(split.splits["valid"]) & set(split.splits["train"])
    assert sorted(split.splits["valid"] + split.splits["train"]) == sorted(corpus.splits["train"])
    assert split.splits["test"] == corpus.splits["test"]


def make_update_stage(model, order_log, crash_at=None, epochs=2):
    """One stage with two optimiser steps per batch: group "a" on one loss, then group "b" on another."""
    data = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    target = data.sum(1, keepdim=True)

    def step(idx, epoch, update):
        if crash_at == epoch:
            raise KeyboardInterrupt("simulated crash")
        first = ((model(data[idx]) - target[idx]) ** 2).mean()
        update("a", first)
        order_log.append("a")
        second = (model(data[idx]) - target[idx]).abs().mean()   # computed after "a" stepped
        update("b", second)
        order_log.append("b")
        return second, len(idx)

    def validate():
        return {"loss": float(((model(data) - target) ** 2).mean())}

    groups = {"a": list(model.a.parameters()), "b": list(model.b.parameters())}
    union = groups["a"] + groups["b"]
    return Stage("joint", "joint", epochs, union, step, validate,
                 lambda epoch: [torch.arange(i, i + 8) for i in range(0, 32, 8)], train_modules=[model],
                 updates=groups, group_lr={"a": 1e-2, "b": 1e-3})


def test_update_mode_steps_each_group_with_its_own_optimiser_and_lr():
    torch.manual_seed(0)
    model = Toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    log = []
    trainer = Trainer(model, [make_update_stage(model, log, epochs=1)],
                      TrainerConfig(progress=False, patience=99))
    trainer.run()
    assert log == ["a", "b"] * 4
    assert set(trainer.optimizers) == {"a", "b"}
    assert trainer.optimizers["a"].param_groups[0]["lr"] == pytest.approx(1e-2)
    assert trainer.optimizers["b"].param_groups[0]["lr"] == pytest.approx(1e-3)
    after = model.state_dict()
    assert not torch.equal(before["a.weight"], after["a.weight"])
    assert not torch.equal(before["b.weight"], after["b.weight"])
    # the "a" optimiser only ever saw group a's parameters
    assert {id(p) for g in trainer.optimizers["a"].param_groups for p in g["params"]} == \
        {id(p) for p in model.a.parameters()}


def test_update_mode_resume_equals_an_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    model = Toy()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer(model, [make_update_stage(model, [], epochs=3)], TrainerConfig(progress=False, patience=99)).run()
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(init)
    torch.manual_seed(0)
    cfg = TrainerConfig(progress=False, patience=99, out_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        Trainer(model, [make_update_stage(model, [], crash_at=2, epochs=3)], cfg).run()
    model.load_state_dict(init)  # the resumed run must take everything from the checkpoint
    Trainer(model, [make_update_stage(model, [], epochs=3)], TrainerConfig(**{**cfg.__dict__, "resume": True})).run()
    for k in expected:
        assert torch.equal(model.state_dict()[k], expected[k]), k


def test_update_mode_rejects_an_unknown_group():
    model = Toy()
    stage = make_update_stage(model, [], epochs=1)
    stage.train_step = lambda idx, epoch, update: (update("c", model(idx.float()[:, None].repeat(1, 4)).sum()), 1)
    with pytest.raises(KeyError, match="no optimiser group 'c'"):
        Trainer(model, [stage], TrainerConfig(progress=False)).run()
    stage.train_step = lambda idx, epoch, update: (update(("a", "c"), model(idx.float()[:, None].repeat(1, 4)).sum()),
                                                   1)
    with pytest.raises(KeyError, match="no optimiser group 'c'"):
        Trainer(model, [stage], TrainerConfig(progress=False)).run()


def test_update_of_several_groups_steps_each_from_one_backward():
    model = Toy()
    stage = make_update_stage(model, [], epochs=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def train_step(idx, epoch, update):
        loss = ((model(idx.float()[:, None].repeat(1, 4)) - 1) ** 2).mean()
        update(("a", "b"), loss)
        return loss.detach(), 1

    stage.train_step = train_step
    Trainer(model, [stage], TrainerConfig(progress=False, lr=1e-2)).run()
    after = model.state_dict()
    assert not torch.equal(before["a.weight"], after["a.weight"]) and not torch.equal(before["b.weight"],
                                                                                        after["b.weight"])


def test_variant_config_resumes_only_variants_that_began(tmp_path):
    from imer_fast.train.trainer import CHECKPOINT, variant_config

    base = TrainerConfig(resume=True, progress=False)
    (tmp_path / "system").mkdir()
    (tmp_path / "system" / CHECKPOINT).write_bytes(b"")
    first = variant_config(base, tmp_path, "system", first=True)
    assert first.resume and first.out_dir == str(tmp_path / "system")
    assert not variant_config(base, tmp_path, "zero_fill", first=False).resume    # never began: fresh
    assert variant_config(base, tmp_path, "other", first=True).resume             # the first must resume (or fail)
    (tmp_path / "zero_fill").mkdir()
    (tmp_path / "zero_fill" / CHECKPOINT).write_bytes(b"")
    assert variant_config(base, tmp_path, "zero_fill", first=False).resume
    assert not variant_config(TrainerConfig(progress=False), tmp_path, "zero_fill", first=False).resume
    assert variant_config(base, None, "x", first=True).out_dir is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_trainers_fused_adamw_takes_torchs_adamw_steps(dtype):
    """adamw() (fused where the device has it) follows the AdamW update of torch's reference loop."""
    from imer_fast.train.trainer import adamw

    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen, dtype=dtype) for s in ((7, 5), (3,), (2, 4, 6))]
    grads = [[torch.randn(t.shape, generator=gen, dtype=dtype) for t in start] for _ in range(4)]
    ours = [t.clone().requires_grad_() for t in start]
    reference = [t.clone().requires_grad_() for t in start]
    fast = adamw(ours, lr=1e-2, weight_decay=0.05)
    assert fast.defaults["fused"]
    slow = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.05, foreach=False)
    for step in grads:
        for params, opt in ((ours, fast), (reference, slow)):
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    integer = torch.zeros(2, dtype=torch.long)   # not a float tensor: the default implementation
    assert adamw([torch.zeros(2, requires_grad=True)], lr=1.0, weight_decay=0.0).defaults["fused"]
    assert not adamw([torch.zeros(2, requires_grad=True), integer], lr=1.0, weight_decay=0.0).defaults["fused"]
