"""`vaelab evaluate --k`, `vaelab gap` and `vaelab report`: the numbers users read, and the page."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from browser import check_page_in_browser, skip_unless_browser
from conftest import vaelab_cli
from vaelab.cli import app as cli
from vaelab.estimator.facade import EVAL_SEED
from vaelab.evaluation.ais import ais
from vaelab.runs.model_data import load_examples, model_data, open_model

TINY = ["--epochs", "30", "--hidden", "32", "--latent-dim", "2", "--batch-size", "64"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("runs") / "digits"
    assert cli.main(["train", "digits", "--out", str(folder), "--quiet", *TINY]) == 0
    return folder


def test_evaluate_with_k_reports_iwae_above_the_elbo_and_diagnostics(trained, capsys):
    code, out, _ = vaelab_cli(capsys, "evaluate", trained, "--k", "200", "--json")
    assert code == 0
    result = json.loads(out)
    iwae = result["iwae"]
    assert iwae["k"] == 200 and iwae["examples"] == result["count"] == 180
    assert iwae["bound"] == "IWAE-200" and result["bound"] == "ELBO"
    # IWAE-k ≥ ELBO on average (Burda et al. 2016; tested against closed forms in
    # test_loglik.py); a 2-D latent leaves only a few hundredths of a nat between them.
    assert iwae["mean"] > result["elbo"]
    # Grey digits under a Bernoulli: log p is a cross-entropy, so no bits per dimension (once,
    # every image model showed one, even Gaussian densities: "-2.229 bits/dim").
    assert iwae["bits_per_dim"] is None and "cross-entropy" in iwae["bits_per_dim_note"]
    found = result["diagnostics"]
    assert 0 <= found["active_units"] <= found["latent_dim"] == 2
    assert sum(found["kl_per_dimension"]) == pytest.approx(found["rate"]["mean"], rel=1e-4)
    assert found["rate"]["mean"] == pytest.approx(result["kl"], rel=1e-4)
    code, out, _ = vaelab_cli(capsys, "evaluate", trained, "--k", "50")
    assert code == 0 and "IWAE-50" in out and "active units" in out
    assert "bits/dim" in out and "not defined" in out


@pytest.mark.parametrize(
    ("likelihood", "binarize", "defined"),
    [
        ("bernoulli", "threshold", True),
        ("gaussian", "none", False),
        ("continuous-bernoulli", "none", False),
    ],
)
def test_bits_per_dimension_only_where_they_are_a_code_length(
    tmp_path, capsys, likelihood, binarize, defined
):
    """A probability of the stored values (a Bernoulli on binary pixels) has bits per dimension,
    −log₂ p / D; a density on [0, 1] pixels has none, and the output says why."""
    folder = tmp_path / "run"
    options = ["--likelihood", likelihood, "--binarize", binarize, "--epochs", "2", "-q"]
    assert cli.main(["train", "digits", "--out", str(folder), *options]) == 0
    capsys.readouterr()
    code, out, _ = vaelab_cli(capsys, "evaluate", folder, "--k", "20", "--json", "--no-diagnostics")
    iwae = json.loads(out)["iwae"]
    if defined:
        assert iwae["bits_per_dim"] == pytest.approx(-iwae["mean"] / (64 * np.log(2)))
    else:
        assert iwae["bits_per_dim"] is None and "density" in iwae["bits_per_dim_note"]


def test_evaluate_with_ais_is_the_librarys_ais_on_the_same_examples(trained, capsys):
    argv = ["--ais", "30", "--ais-chains", "4", "--examples", "12", "--no-diagnostics"]
    code, out, _ = vaelab_cli(capsys, "evaluate", trained, *argv, "--json")
    assert code == 0
    found = json.loads(out)["ais"]
    assert (found["steps"], found["chains"], found["examples"]) == (30, 4, 12)
    assert found["bound"] == "AIS-30" and 0 < found["acceptance_rate"] <= 1
    assert 1 <= found["mean_effective_sample_size"] <= 4
    opened = open_model(trained)
    x = load_examples(model_data(opened).subset(12))
    direct = ais(opened.estimator.model_, x, chains=4, steps=30, seed=EVAL_SEED)
    assert found["mean"] == pytest.approx(direct.mean, abs=1e-9)
    assert found["standard_error"] == pytest.approx(direct.standard_error, abs=1e-9)
    code, out, _ = vaelab_cli(capsys, "evaluate", trained, *argv)
    assert code == 0 and "AIS-30" in out and "4 chains" in out


def test_evaluate_on_a_random_subset(trained, capsys):
    """--examples N: a seeded random N of the test split, the same every time, said so."""
    argv = ("evaluate", trained, "--examples", "40", "--json", "--no-diagnostics")
    code, out, _ = vaelab_cli(capsys, *argv)
    result = json.loads(out)
    assert code == 0 and result["count"] == 40 and "diagnostics" not in result
    assert "a random 40 of its 180 examples" in result["examples_described"]
    assert json.loads(vaelab_cli(capsys, *argv)[1])["elbo"] == result["elbo"]


def test_gap_splits_the_total_gap(trained, capsys):
    code, out, _ = vaelab_cli(
        capsys, "gap", trained, "--n", "30", "--k", "500", "--steps", "200", "--json"
    )
    assert code == 0
    result = json.loads(out)
    assert result["examples"] == 30 and list(result["families"]) == ["diagonal", "full"]
    # The seam: gap reads the same 30 examples evaluate does with --examples 30, so its
    # amortised ELBO is evaluate's ELBO there (independent Monte Carlo draws: within 4 standard
    # errors), and its log p(x), by IWAE with q*, agrees with IWAE-2000 with the encoder.
    argv = ("evaluate", trained, "--examples", "30", "--k", "2000", "--json", "--no-diagnostics")
    evaluation = json.loads(vaelab_cli(capsys, *argv)[1])
    diagonal, full = result["families"]["diagonal"], result["families"]["full"]
    assert diagonal["log_px"]["mean"] == full["log_px"]["mean"]
    amortised = diagonal["elbo_amortised"]["mean"]
    assert abs(amortised - evaluation["elbo"]) < 0.1  # Monte Carlo noise only: the same examples
    iwae = evaluation["iwae"]
    assert abs(full["log_px"]["mean"] - iwae["mean"]) < 0.05
    for found in (diagonal, full):
        assert found["elbo_optimal"]["mean"] >= amortised - 1e-3  # q* starts at q, climbs
    code, out, _ = vaelab_cli(capsys, "gap", trained, "--n", "10", "--k", "100", "--steps", "50")
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
        (["report", "{run}", "--iwae-examples", "many"], "a number of examples or 'all'"),
        (["report", "{run}", "--gap-steps", "0"], "--gap-steps must be at least 1"),
        (["evaluate", "{run}", "--split", "everything"], "invalid choice: 'everything'"),
        (
            ["evaluate", "{run}", "--data", "digits", "--split", "all"],
            "--split must be train, valid or test",
        ),
        (["evaluate", "{run}", "--device", "cuda"], "not available here"),
        (["report", "{tmp}/missing"], "does not exist"),
    ],
)
def test_bad_evaluation_options_are_one_line_and_exit_2(trained, tmp_path, capsys, args, message):
    argv = [a.format(run=trained, tmp=tmp_path) for a in args]
    code, out, err = vaelab_cli(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_report_without_iwae_still_has_its_gaps(trained, capsys, tmp_path):
    """--k 0 leaves IWAE out and nothing else (once it failed unless --gap-examples 0 too)."""
    out = tmp_path / "r.html"
    code, _, err = vaelab_cli(
        capsys, "report", trained, "--k", "0", "--gap-examples", "5", "-o", out
    )
    assert code == 0, err
    html = out.read_text()
    assert "IWAE-" not in html and "approximation gap (diagonal)" in html


@pytest.mark.parametrize("where", ["missing folder", "a folder"])
def test_report_to_an_output_it_cannot_write_fails_before_any_work(
    trained, capsys, tmp_path, monkeypatch, where
):
    """`report -o missing/r.html` once evaluated the model, drew every figure, and only then
    failed on its temporary file; now it is one line and exit 2, before the model is opened."""
    from vaelab.report import content

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the report was built for an output it cannot write")

    monkeypatch.setattr(content, "build_report", no_work)
    monkeypatch.setattr(content, "open_model", no_work)
    out = tmp_path / "missing" / "r.html" if where == "missing folder" else tmp_path
    before = sorted(tmp_path.rglob("*"))
    code, stdout, err = vaelab_cli(capsys, "report", trained, "-o", out)
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vaelab: error: "), err
    assert str(out) in err and stdout == ""
    assert sorted(tmp_path.rglob("*")) == before


def test_report_is_written_and_renders_in_a_browser(trained, capsys, tmp_path):
    code, out, _ = vaelab_cli(capsys, "report", trained, "--k", "100", "--gap-examples", "10")
    assert code == 0
    page = trained / "report.html"
    html = page.read_text()
    for section in ("Metrics", "Training curves", "Samples", "Reconstructions", "Latent space",
                    "Interpolations", "IWAE-100", "approximation gap", "active units"):  # fmt: skip
        assert section in html, section
    assert 'src="http' not in html
    # The latent explorer is the page's one script (and its JSON data block).
    assert 'id="latent-map"' in html and 'id="latent-decoded"' in html
    assert html.count("<script") == 2 and 'id="latent-data"' in html
    # A 2-D latent gets the manifold figure.
    assert "manifold" in html.lower()
    skip_unless_browser()
    problems = check_page_in_browser(page, tmp_path / "report.png")
    assert problems == []
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_a_model_trained_on_a_file_is_evaluated_on_its_own_test_split(tmp_path, capsys):
    """Once, `evaluate` of a model trained on a file read all of the file, training rows
    included; now the test split by default, whatever the source, and every output says which."""
    x = (np.random.default_rng(0).random((200, 6)) < 0.3).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    folder = tmp_path / "run"
    train = ["train", tmp_path / "x.npy", "--out", folder, "--epochs", "1", "--hidden", "8", "-q"]
    assert vaelab_cli(capsys, *train)[0] == 0
    capsys.readouterr()

    def evaluated(*options: object) -> dict:
        code, out, err = vaelab_cli(
            capsys, "evaluate", folder, "--json", "--no-diagnostics", *options
        )
        assert code == 0, err
        return json.loads(out)

    default = evaluated()
    assert default["count"] == 20 and default["split"] == "test split"
    assert "x.npy (test split, 20 examples)" in default["examples_described"]
    assert evaluated("--data", tmp_path / "x.npy")["count"] == 20  # the same file, named
    assert evaluated("--split", "valid")["split"] == "validation split"
    assert evaluated("--split", "all")["count"] == 200
    np.save(tmp_path / "other.npy", x[:30])
    other = evaluated("--data", tmp_path / "other.npy")
    assert other["count"] == 30 and other["split"] == "all examples"
    code, out, _ = vaelab_cli(capsys, "encode", folder, "--out", tmp_path / "z.npy")
    assert code == 0 and "test split, 20 examples" in out
    assert np.load(tmp_path / "z.npy").shape == (20, 8)
    code, out, _ = vaelab_cli(capsys, "evaluate", folder)
    assert code == 0 and "(test split, 20 examples)" in out


def test_gap_and_report_of_a_full_covariance_model(tmp_path, capsys):
    """A full-covariance encoder lies in the full family only: `gap` reports that family (once
    both commands failed: the diagonal family 'does not contain' the amortised q)."""
    folder = tmp_path / "full"
    train = ["train", "digits", "--out", folder, "--posterior", "full", "--epochs", "2", "-q"]
    assert vaelab_cli(capsys, *train)[0] == 0
    capsys.readouterr()
    argv = ("gap", folder, "--n", "6", "--k", "50", "--steps", "20", "--json")
    code, out, err = vaelab_cli(capsys, *argv)
    assert code == 0, err
    result = json.loads(out)
    assert list(result["families"]) == ["full"]
    code, _, err = vaelab_cli(
        capsys, "report", folder, "--k", "20", "--gap-examples", "4", "--gap-steps", "5"
    )
    assert code == 0, err
    html = (folder / "report.html").read_text()
    assert "approximation gap (full)" in html and "(diagonal)" not in html


@pytest.mark.slow
def test_long_evaluation_shows_progress_on_a_terminal_and_quiet_hides_it(trained, tmp_path):
    """Progress bars go to stderr when it is a terminal (a pseudo-terminal here), not with
    --quiet, and never into --json's stdout."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    def stderr_on_a_terminal(*options: str) -> tuple[str, str]:
        leader, follower = pty.openpty()
        # A new pseudo-terminal is 0 columns wide, where tqdm draws nothing: make it 120.
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        process = subprocess.Popen(
            [sys.executable, "-m", "vaelab", "evaluate", str(trained), "--k", "400", *options],
            stdout=subprocess.PIPE, stderr=follower, text=True,
        )  # fmt: skip
        os.close(follower)
        chunks = []
        while True:
            try:
                data = os.read(leader, 4096)
            except OSError:  # the terminal closed: the process is done
                break
            if not data:
                break
            chunks.append(data)
        out, _ = process.communicate(timeout=120)
        os.close(leader)
        assert process.returncode == 0
        return out, b"".join(chunks).decode(errors="replace")

    out, err = stderr_on_a_terminal("--json")
    assert "IWAE-400" in err and "ELBO" in err
    json.loads(out)  # stdout is the JSON alone
    _, err = stderr_on_a_terminal("--json", "--quiet")
    assert "IWAE-400" not in err


@pytest.mark.parametrize(
    "options",
    [
        ["--prior", "mixture", "--latent-dim", "3,2", "--hidden", "16"],
        ["--posterior", "full", "--likelihood", "gaussian-decoder", "--latent-dim", "3,2"],
    ],
    ids=["mixture-two-layers", "full-gaussian-decoder"],
)
def test_ais_of_models_whose_hmc_steps_diverge_finishes_with_finite_estimates(
    tmp_path, capsys, options
):
    """AIS on these models meets leapfrog trajectories that leave for NaN; it once ended with
    'Expected value argument … within the support' instead of rejecting those steps."""
    folder = tmp_path / "model"
    train = ["train", "digits", "--out", folder, "--epochs", "2", "-q", *options]
    assert vaelab_cli(capsys, *train)[0] == 0
    code, out, err = vaelab_cli(
        capsys,
        "evaluate",
        folder,
        "--k",
        "20",
        "--ais",
        "50",
        "--examples",
        "5",
        "--no-diagnostics",
        "--json",
    )
    assert code == 0, err[:300]
    found = json.loads(out)["ais"]
    assert all(np.isfinite(found[key]) for key in ("mean", "acceptance_rate")), found
