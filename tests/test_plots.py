"""flows/plots.py: the report's PNGs from a stats dict, and the report that embeds them."""

import base64
import struct
from types import SimpleNamespace

import pytest
from matplotlib.image import imread

from awqflow.flows import plots
from awqflow.flows.report import markdown_report

GROUPS = {
    "input_layernorm->self_attn.q_proj,self_attn.k_proj,self_attn.v_proj": 1.0,
    "self_attn.v_proj->self_attn.o_proj": 0.5,
    "post_attention_layernorm->mlp.gate_proj,mlp.up_proj": 2.0,
    "mlp.up_proj->mlp.down_proj": 4.0,
}


def fake_stats(n_blocks: int, string_keys: bool = False) -> dict:
    stats = {}
    for b in range(n_blocks):
        groups = {}
        for name, m in GROUPS.items():
            q = [m * f * (1 + 0.1 * b) for f in (0.3, 0.5, 0.8, 1.0, 1.3, 3.0, 9.0)]
            groups[name] = {
                "alpha": 0.5,
                "loss": 0.1,
                "loss_identity": 0.2,
                "scale_mean": q[3] * 1.1,
                "scale_max_over_mean": q[6] / q[3],
                "share_over_5x_mean": 0.01,
                "scale_quantiles": q,
            }
        stats[str(b) if string_keys else b] = {
            "groups": groups,
            "output_mse_rtn": 0.1 * (b + 1),
            "output_mse_awq": 0.02 * (b + 1),
        }
    return stats


def png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.mark.parametrize("n_blocks,string_keys", [(4, False), (32, True)])
def test_plots_are_valid_pngs_of_sensible_size(tmp_path, n_blocks, string_keys):
    made = plots.write_plots(fake_stats(n_blocks, string_keys), str(tmp_path / "run.report"))
    assert set(made.values()) == {
        str(tmp_path / "run.report" / "scales.png"),
        str(tmp_path / "run.report" / "block-error.png"),
    }
    for path in made.values():
        w, h = png_size(path)
        assert 400 <= w <= 2200 and 250 <= h <= 1600, (path, w, h)
        pixels = imread(path)  # decodes: a whole, readable image
        assert pixels.shape[:2] == (h, w)
        rgb = pixels[..., :3]
        assert rgb.std() > 0.05 and (rgb < 0.9).mean() > 0.01, f"{path} is (nearly) blank"
    # four layer-type panels stacked: the scale plot grows with the panels and with the blocks
    w4, h4 = png_size(made["AWQ scales per block and layer type"])
    assert h4 > 600 and (w4 > 1000) == (n_blocks > 16)


def test_missing_data_is_skipped_not_fatal(tmp_path):
    stats = fake_stats(2)
    del stats[1]["groups"]["mlp.up_proj->mlp.down_proj"]["scale_quantiles"]  # an older cache entry
    only_scales = {b: {"groups": s["groups"]} for b, s in stats.items()}
    assert list(plots.write_plots(only_scales, str(tmp_path / "a"))) == ["AWQ scales per block and layer type"]
    assert plots.write_plots({0: {}, 1: {}}, str(tmp_path / "b")) == {}  # an RTN run: no search stats
    assert not (tmp_path / "b").exists()


def test_layer_types():
    assert [plots.layer_type(g) for g in GROUPS] == ["q/k/v", "o", "gate/up", "down"]
    assert plots.layer_type("input_layernorm->attention.query_key_value") == "q/k/v"
    assert plots.layer_type("fc1->fc2") == "down" and plots.layer_type("final_layer_norm->fc1") == "gate/up"
    assert plots.layer_type("mlp.experts.3.up_proj->mlp.experts.3.down_proj") == "down"
    assert plots.layer_type("x->mystery") == "other"
    assert plots.report_dir("out/model-awq/") == "out/model-awq.report"


def test_report_embeds_the_pictures(tmp_path):
    made = plots.write_plots(fake_stats(2), str(tmp_path))
    opts = SimpleNamespace(
        method="awq", w_bit=4, group_size=128, zero_point=True, block_mode="parallel", format="awq-gemm"
    )
    uris = {t: plots.data_uri(p) for t, p in made.items()}
    md = markdown_report("m", "o", opts, 2**20, 2**18, {"total": 1.0}, {}, pictures=uris)
    assert "## Plots" in md and md.count("](data:image/png;base64,") == 2
    src = uris["Block output error, RTN vs AWQ"]
    assert base64.b64decode(src.split(",", 1)[1]) == open(made["Block output error, RTN vs AWQ"], "rb").read()
    assert "## Plots" not in markdown_report("m", "o", opts, 1, 1, {}, {})
