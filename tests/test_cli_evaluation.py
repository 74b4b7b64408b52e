"""`vaelab evaluate --k`, `vaelab gap` and `vaelab report`: the numbers users read, and the page."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from browser import check_page_in_browser, skip_unless_browser
from vaelab import apply, cli
from vaelab.ais import ais
from vaelab.estimator import EVAL_SEED

TINY = ["--epochs", "30", "--hidden", "32", "--latent-dim", "2", "--batch-size", "64"]


def run(capsys, *args: object) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("runs") / "digits"
    assert cli.main(["train", "digits", "--out", str(folder), "--quiet", *TINY]) == 0
    return folder


def test_evaluate_with_k_reports_iwae_above_the_elbo_and_diagnostics(trained, capsys):
    code, out, _ = run(capsys, "evaluate", trained, "--k", "200", "--json")
    assert code == 0
    result = json.loads(out)
    iwae = result["iwae"]
    assert iwae["k"] == 200 and iwae["examples"] == result["count"] == 180
    assert iwae["bound"] == "IWAE-200" and result["bound"] == "ELBO"
    # IWAE-k ≥ ELBO on average (Burda et al. 2016; tested against closed forms in
    # test_loglik.py); a 2-D latent leaves only a few hundredths of a nat between them.
    assert iwae["mean"] > result["elbo"]
    assert iwae["bits_per_dim"] == pytest.approx(-iwae["mean"] / (64 * np.log(2)))
    found = result["diagnostics"]
    assert 0 <= found["active_units"] <= found["latent_dim"] == 2
    assert sum(found["kl_per_dimension"]) == pytest.approx(found["rate"]["mean"], rel=1e-4)
    assert found["rate"]["mean"] == pytest.approx(result["kl"], rel=1e-4)
    code, out, _ = run(capsys, "evaluate", trained, "--k", "50")
    assert code == 0 and "IWAE-50" in out and "active units" in out


def test_evaluate_with_ais_is_the_librarys_ais_on_the_same_examples(trained, capsys):
    argv = ["--ais", "30", "--ais-chains", "4", "--examples", "12", "--no-diagnostics"]
    code, out, _ = run(capsys, "evaluate", trained, *argv, "--json")
    assert code == 0
    found = json.loads(out)["ais"]
    assert (found["steps"], found["chains"], found["examples"]) == (30, 4, 12)
    assert found["bound"] == "AIS-30" and 0 < found["acceptance_rate"] <= 1
    assert 1 <= found["mean_effective_sample_size"] <= 4
    estimator, document = apply.open_model(trained)
    x = apply.load_examples(apply.model_data(estimator, document, None, None), 12)
    direct = ais(
        estimator.model_, x, chains=4, steps=30, generator=torch.Generator().manual_seed(EVAL_SEED)
    )
    assert found["mean"] == pytest.approx(direct.mean, abs=1e-9)
    assert found["standard_error"] == pytest.approx(direct.standard_error, abs=1e-9)
    code, out, _ = run(capsys, "evaluate", trained, *argv)
    assert code == 0 and "AIS-30" in out and "4 chains" in out


def test_evaluate_on_the_first_examples_only(trained, capsys):
    code, out, _ = run(
        capsys, "evaluate", trained, "--examples", "40", "--json", "--no-diagnostics"
    )
    result = json.loads(out)
    assert code == 0 and result["count"] == 40 and "diagnostics" not in result


def test_gap_splits_the_total_gap(trained, capsys):
    code, out, _ = run(
        capsys, "gap", trained, "--n", "30", "--k", "500", "--steps", "200", "--json"
    )
    assert code == 0
    result = json.loads(out)
    assert result["examples"] == 30
    for family in ("diagonal", "full"):
        found = result["families"][family]
        total = found["approximation_gap"]["mean"] + found["amortisation_gap"]["mean"]
        assert total == pytest.approx(found["total_gap"]["mean"], abs=1e-9)
        assert found["total_gap"]["mean"] > 0  # the amortised ELBO is below log p(x)
    # Both families are measured against the same log p(x).
    diagonal, full = result["families"]["diagonal"], result["families"]["full"]
    assert diagonal["log_px"]["mean"] == full["log_px"]["mean"]
    code, out, _ = run(capsys, "gap", trained, "--n", "10", "--k", "100", "--steps", "50")
    assert code == 0 and "approximation_gap" in out and "amortisation_gap" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate", "{run}", "--k", "0"], "--k must be at least 1"),
        (["evaluate", "{run}", "--examples", "0"], "--examples must be at least 1"),
        (["evaluate", "{run}", "--ais", "0"], "--ais must be at least 1"),
        (
            ["evaluate", "{run}", "--ais", "5", "--ais-chains", "0"],
            "--ais-chains must be at least 1",
        ),
        (["gap", "{run}", "--n", "1"], "--n must be at least 2"),
        (["report", "{run}", "--k", "-1"], "must not be negative"),
        (["report", "{tmp}/missing"], "does not exist"),
    ],
)
def test_bad_evaluation_options_are_one_line_and_exit_2(trained, tmp_path, capsys, args, message):
    argv = [a.format(run=trained, tmp=tmp_path) for a in args]
    code, out, err = run(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_report_is_written_and_renders_in_a_browser(trained, capsys, tmp_path):
    code, out, _ = run(capsys, "report", trained, "--k", "100", "--gap-examples", "10")
    assert code == 0
    page = trained / "report.html"
    html = page.read_text()
    for section in ("Metrics", "Training curves", "Samples", "Reconstructions", "Latent space",
                    "Interpolations", "IWAE-100", "approximation gap", "active units"):  # fmt: skip
        assert section in html, section
    assert 'src="http' not in html and "<script" not in html
    # A 2-D latent gets the manifold figure.
    assert "manifold" in html.lower()
    skip_unless_browser()
    problems = check_page_in_browser(page, tmp_path / "report.png")
    assert problems == []
    assert (tmp_path / "report.png").stat().st_size > 10_000
