"""One options model, reachable from every entry point; methods as plug-ins (issue 12)."""

import inspect
import json
import logging
import typing
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from awqflow import cli, pipeline
from awqflow.options import Options
from awqflow.stages import methods
from awqflow.stages.method import Method, quantized_linears
from awqflow.stages.quantize import QuantConfig, dequantize_codes, quantize_codes
from awqflow.storage.gemm import dequantize_gemm

from conftest import ROOT


def other_value(name: str, field):
    """A valid value of the field that is not its default."""
    kind = field.annotation
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is typing.Literal:
        return next(a for a in args if a != field.default)
    if name == "method":
        return next(m for m in methods.METHODS if m != field.default)
    if kind is bool:
        return not field.default
    if kind is float or args == [float]:
        return (field.default or 0.01) / 2
    if kind is int or args == [int]:
        return (field.default or 7) + 1
    if kind is str or args == [str]:
        return "some/path.txt"
    if args and typing.get_origin(args[0]) is list:
        return ["cpu", "cpu"]
    if args and typing.get_origin(args[0]) is typing.Literal:
        return typing.get_args(args[0])[0]
    raise AssertionError(f"no test value for options field {name}: {kind}")


def cli_words(name: str, value) -> list[str]:
    if isinstance(value, bool):
        return [cli.flag(name) if value else "--no-" + cli.flag(name)[2:]]
    return [cli.flag(name), ",".join(value) if isinstance(value, list) else str(value)]


@pytest.mark.parametrize("name", sorted(Options.model_fields))
def test_every_option_is_reachable_from_the_cli(name):
    value = other_value(name, Options.model_fields[name])
    args = cli.build_parser().parse_args(["quantize", "--model", "m", "--out", "o", *cli_words(name, value)])
    assert getattr(cli.options_from(args), name) == value
    assert cli.options_from(cli.build_parser().parse_args(["quantize", "--model", "m", "--out", "o"])) == Options()


def test_autoawq_names_are_aliases():
    args = cli.build_parser().parse_args(
        [
            "quantize",
            "--model",
            "m",
            "--out",
            "o",
            "--w_bit",
            "3",
            "--q_group_size",
            "64",
            "--no-zero-point",
            "--version",
            "GEMM",
        ]
    )
    assert cli.options_from(args) == Options(w_bit=3, group_size=64, zero_point=False, format="awq-gemm")


@pytest.mark.parametrize("name", sorted(Options.model_fields))
def test_every_option_is_reachable_from_the_deployments(name):
    from awqflow.flows import deploy

    value = other_value(name, Options.model_fields[name])
    param = f"{name}={value if isinstance(value, str) else json.dumps(value)}"  # as a user types it
    quantize, watch = deploy.deployments(deploy.build_parser().parse_args(["--param", param]))
    for d in (quantize, watch):
        assert getattr(Options(**d.parameters["options"]), name) == value


def test_flows_take_the_options_model_and_the_watcher_passes_it_on(monkeypatch, tmp_path):
    from awqflow.flows import awq as awq_module
    from awqflow.flows import watch

    for f in (awq_module.awq, watch.requantize):
        assert inspect.signature(f.fn).parameters["options"].annotation is Options
    calls = []
    monkeypatch.setattr(watch, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(watch.awq, "with_options", lambda **kw: lambda **call: calls.append(call))
    (tmp_path / "ck" / "a").mkdir(parents=True)
    (tmp_path / "ck" / "a" / "config.json").write_text("{}")
    options = Options(w_bit=3, n_grid=5, seed=3)
    watch.requantize.fn(str(tmp_path / "ck"), str(tmp_path / "out"), options=options, settle_s=0)
    assert [c["options"] for c in calls] == [options]


def test_prefect_yaml_passes_options_the_model_accepts():
    spec = yaml.safe_load((Path(ROOT) / "prefect.yaml").read_text())
    for d in spec["deployments"]:
        Options(**d["parameters"]["options"])  # unknown or bad fields raise


def test_a_bad_value_is_one_line_from_every_entry_point(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "--model", "m", "--out", "o", "--group-size", "48"])
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == "awqflow: error: group_size=48: Input should be 128, 64, 32 or -1"
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        Options(method="nope")


# ------------------------------------------------------------------ a method is a module plus a registry line


def round_with_clip(block, arch, inputs, opts):
    """The toy method: round to nearest after clipping every weight to 90 % of its row's range."""
    codes = {}
    for name, lin in quantized_linears(block, arch).items():
        w = lin.weight.data
        limit = 0.9 * w.abs().amax(dim=1, keepdim=True)
        codes[name] = quantize_codes(torch.maximum(torch.minimum(w, limit), -limit), opts.quant)
    return codes, {"clipped": 0.9}


TOY = Method("toy-clip", round_with_clip, needs_inputs=False)


def test_a_new_method_is_one_module_and_one_registry_line(monkeypatch, tiny_model, tmp_path):
    monkeypatch.setitem(methods.METHODS, TOY.name, TOY)  # the registry line
    result = pipeline.run(
        str(tiny_model), str(tmp_path / "toy"), Options(method="toy-clip", group_size=64, work_dir=str(tmp_path / "w"))
    )
    assert result["stats"] == {0: {"clipped": 0.9}, 1: {"clipped": 0.9}}
    saved = load_file(tmp_path / "toy" / "model.safetensors")
    fp = load_file(Path(tiny_model) / "model.safetensors")
    w = fp["model.layers.1.mlp.down_proj.weight"].float()
    limit = 0.9 * w.abs().amax(dim=1, keepdim=True)
    expected = dequantize_codes(*quantize_codes(w.clamp(-limit, limit), QuantConfig(4, 64)))
    got = dequantize_gemm(*(saved[f"model.layers.1.mlp.down_proj.{k}"] for k in ("qweight", "qzeros", "scales")))
    torch.testing.assert_close(got.t().float(), expected.half().float(), rtol=0, atol=0)
