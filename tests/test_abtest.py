"""The blind A/B test: prepare on tiny models, the server over real HTTP, the page in a real browser, and results
against numbers worked by hand."""
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT, tiny_llama

from nanorlhf import abtest as A
from nanorlhf import evaluate as E
from nanorlhf.cli import main

PROMPT = [{"role": "user", "content": "Name a fruit."}]


def write_test(folder, rows, baseline="base", models=("m1",)):
    """An A/B test's folder as prepare writes it, from rows (question_id, model_a, model_b, answer_a, answer_b)."""
    os.makedirs(folder, exist_ok=True)
    tasks = "".join(json.dumps({"id": i, "prompt": PROMPT, "a": a, "b": b}) + "\n"
                    for i, (_, _, _, a, b) in enumerate(rows, 1))
    (folder / "tasks.jsonl").write_text(tasks)
    key = {"baseline": baseline, "models": list(models), "seed": 0,
           "tasks_sha256": hashlib.sha256(tasks.encode()).hexdigest(),
           "sides": [{"id": i, "question_id": q, "model_a": ma, "model_b": mb}
                     for i, (q, ma, mb, _, _) in enumerate(rows, 1)]}
    (folder / "key.json").write_text(json.dumps(key))
    return str(folder)


def write_votes(folder, votes):
    """votes.jsonl from (rater, id, winner[, ratings])."""
    (folder / "votes.jsonl").write_text("".join(
        json.dumps({"id": v[1], "rater": v[0], "winner": v[2], "ratings": v[3] if len(v) > 3 else {},
                    "tstamp": 1.0 + n}) + "\n" for n, v in enumerate(votes)))


def fails(capsys, fn, cls, argv):
    """Run a command as its CLI does: the one error line it prints, after checking it exits 2."""
    with pytest.raises(SystemExit) as e:
        main(fn, cls, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    return err


# ---------------------------------------------------------------- prepare


def test_prepare_hides_the_models_balances_the_sides_and_samples_as_evaluate(tiny_dir, tokenizer, tmp_path, capsys):
    """The tasks name no model; each model is A on half its prompts; the answers are the ones evaluate samples with
    the same flags (so a judge's battle records are about the answers people see: results checks them); a second
    prepare into the folder stops before touching anything once it holds votes."""
    other = str(tmp_path / "other")
    tiny_llama(len(tokenizer), seed=5).save_pretrained(other)
    tokenizer.save_pretrained(other)
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(6)))
    out = tmp_path / "ab"
    flags = dict(model=[other], baseline=tiny_dir, data=str(data), limit=6, max_new_tokens=4, batch_size=3, seed=3)
    key = A.prepare(A.PrepareArgs(out=str(out), **flags))
    tasks = [json.loads(line) for line in (out / "tasks.jsonl").read_text().splitlines()]
    assert len(tasks) == 6 and [t["id"] for t in tasks] == [s["id"] for s in key["sides"]] == list(range(1, 7))
    assert other not in (out / "tasks.jsonl").read_text() and tiny_dir not in (out / "tasks.jsonl").read_text()
    assert sum(s["model_a"] == other for s in key["sides"]) == 3
    assert sorted(s["question_id"] for s in key["sides"]) == list(range(6))

    from nanorlhf import model as M
    from nanorlhf.data import load_prompts
    base, tok = M.load_model(tiny_dir)
    prompts = load_prompts(str(data), tok, 256, limit=6)
    model, other_tok = M.load_model(other)
    args = E.Args(**flags)
    answers = {tiny_dir: E.sample(base, tok, prompts, tok, args)[3],
               other: E.sample(model, other_tok, prompts, tok, args)[3]}
    for t, s in zip(tasks, key["sides"]):
        assert t["prompt"] == prompts[s["question_id"]].messages
        assert (t["a"], t["b"]) == (answers[s["model_a"]][s["question_id"]], answers[s["model_b"]][s["question_id"]])

    # a judge run by evaluate with prepare's flags judged those very answers: results takes its records
    write_votes(out, [("ann", 1, "A")])
    judge_file = tmp_path / "judge.jsonl"
    E.evaluate(E.Args(judge=tiny_dir, battles=str(judge_file), **flags))
    report = A.results(A.ResultsArgs(dir=str(out), battles=[str(judge_file)]))
    assert report["win"][f"judge:{tiny_dir}"][other]["prompts"] == 6 and report["judges"][f"judge:{tiny_dir}"][1] == 1

    votes_before = (out / "votes.jsonl").read_bytes()
    capsys.readouterr()
    err = fails(capsys, A.prepare, A.PrepareArgs, ["--out", str(out), "--overwrite", "--model", other,
                                                   "--baseline", tiny_dir, "--data", str(data)])
    assert "votes.jsonl holds the votes" in err and (out / "votes.jsonl").read_bytes() == votes_before
    fresh = tmp_path / "fresh"
    shutil.copytree(out, fresh)
    os.remove(fresh / "votes.jsonl")
    err = fails(capsys, A.prepare, A.PrepareArgs, ["--out", str(fresh), "--model", other, "--baseline", tiny_dir,
                                                   "--data", str(data)])
    assert "tasks.jsonl exists; --overwrite replaces it" in err


# ---------------------------------------------------------------- the server over HTTP


@pytest.fixture
def server(tmp_path):
    """A running server on 127.0.0.1 and an ephemeral port over three tasks; (base URL, folder). Stopped after."""
    folder = write_test(tmp_path / "ab", [(0, "m1", "base", "Apple.", "<b>Pear</b>"),
                                          (1, "base", "m1", "Fig.", "Kiwi."), (2, "m1", "base", "Plum.", "Lime.")])
    started = []

    def start():
        s = A.make_server(folder, "127.0.0.1", 0)
        threading.Thread(target=s.serve_forever, daemon=True).start()
        started.append(s)
        return f"http://127.0.0.1:{s.server_address[1]}"
    yield start, tmp_path / "ab"
    for s in started:
        s.shutdown()
        s.server_close()
        s.ballot.file.close()


def call(url, vote=None, content_type="application/json"):
    """(status, parsed JSON body or text) of a GET, or of a POST of `vote`."""
    data = None if vote is None else (vote if isinstance(vote, bytes) else json.dumps(vote).encode())
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            status, body = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read().decode()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def test_server_takes_votes_over_http_and_resumes_from_disk(server):
    start, folder = server
    url = start()
    status, page = call(url + "/")
    assert status == 200 and "Which answer is better?" in page and '"helpfulness", "relevance"' in page
    status, body = call(url + "/api/next?rater=ann")
    assert status == 200 and body["task"]["id"] == 1 and body["task"]["b"] == "<b>Pear</b>"
    assert (body["done"], body["total"]) == (0, 3) and "model_a" not in json.dumps(body)
    status, body = call(url + "/api/vote", {"rater": "ann", "id": 1, "winner": "A", "ratings": {"A": {"safety": 5}}})
    assert status == 200 and body["task"]["id"] == 2 and body["done"] == 1
    lines = (folder / "votes.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["ratings"] == {"A": {"safety": 5}}  # on disk before the reply

    # refused, and nothing written: a second vote on a task, a side that does not exist, a task that does not, a
    # rating off the scale, and a form post (what a page on another site can send unasked)
    assert call(url + "/api/vote", {"rater": "ann", "id": 1, "winner": "B"})[0] == 409
    status, body = call(url + "/api/vote", {"rater": "ann", "id": 2, "winner": "C"})
    assert status == 400 and "winner 'C' is not a side" in body["error"]
    assert call(url + "/api/vote", {"rater": "ann", "id": 9, "winner": "A"})[0] == 400
    assert call(url + "/api/vote", {"rater": "ann", "id": 2, "winner": "A", "ratings": {"A": {"safety": 6}}})[0] == 400
    assert call(url + "/api/vote", b"rater=ann&id=2&winner=A", "application/x-www-form-urlencoded")[0] == 415
    assert len((folder / "votes.jsonl").read_text().splitlines()) == 1

    # nothing outside the routes, however the path is spelt
    for path in ("/tasks.jsonl", "/key.json", "/votes.jsonl", "/../key.json", "/%2e%2e/ab/key.json",
                 "/api/next/../../key.json", "/api/vote", "//etc/passwd", "/index.html"):
        status, body = call(url + path)
        assert status == 404 and "base" not in json.dumps(body) and "Apple" not in json.dumps(body), path
    assert call(url + "/", {"rater": "ann", "id": 2, "winner": "A"})[0] == 404

    # another rater starts at the first task; two raters voting at once both land, each line whole
    assert call(url + "/api/next?rater=bob")[1]["task"]["id"] == 1
    votes = [{"rater": r, "id": i, "winner": w} for r, w in (("bob", "B"), ("cy", "tie")) for i in (1, 2, 3)]
    with ThreadPoolExecutor(6) as pool:
        assert {s for s, _ in pool.map(lambda v: call(url + "/api/vote", v), votes)} == {200}
    on_disk = [json.loads(line) for line in (folder / "votes.jsonl").read_text().splitlines()]
    assert sorted((v["rater"], v["id"]) for v in on_disk) == [("ann", 1)] + sorted((v["rater"], v["id"]) for v in votes)

    # a new server on the same folder: ann goes on at task 2, and bob is done
    url = start()
    assert call(url + "/api/next?rater=ann")[1] | {"task": None} == {"task": None, "done": 1, "total": 3}
    assert call(url + "/api/next?rater=ann")[1]["task"]["id"] == 2
    assert call(url + "/api/next?rater=bob")[1] == {"task": None, "done": 3, "total": 3}


# ---------------------------------------------------------------- the page in a real browser

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def browser_missing():
    """Why the browser test cannot run here, or None."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        return "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium (pip install -e '.[test]')"
    return None


@pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))
def test_a_rater_votes_in_a_real_browser_by_click_and_key_and_resumes_after_a_reload(server, tmp_path, monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never fetch a driver or a browser
    start, folder = server
    url = start()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        wait = WebDriverWait(driver, 20)

        def at(done, answer_a):
            wait.until(lambda d: d.find_element(By.ID, "progress").text == f"{done} of 3 done"
                       and d.find_element(By.ID, "a").text == answer_a)
        driver.get(url + "/")
        name = driver.find_element(By.ID, "name")
        name.send_keys("ann")
        name.submit()
        at(0, "Apple.")
        assert driver.find_element(By.ID, "b").text == "<b>Pear</b>"  # a model's markup is shown as text
        Select(driver.find_element(By.ID, "rate-A-helpfulness")).select_by_value("4")
        Select(driver.find_element(By.ID, "rate-B-fluency")).select_by_value("2")
        driver.find_element(By.CSS_SELECTOR, "#pick button[data-winner='A']").click()
        at(1, "Fig.")
        driver.find_element(By.TAG_NAME, "body").send_keys("2")  # B
        at(2, "Plum.")
        driver.refresh()  # the name is remembered and the votes file says where ann is
        at(2, "Plum.")
        assert driver.find_element(By.ID, "rater").text == "ann"
        driver.find_element(By.TAG_NAME, "body").send_keys("x")  # both bad
        wait.until(lambda d: d.find_element(By.ID, "finished").is_displayed())
        assert driver.find_element(By.ID, "progress").text == "3 of 3 done"
    finally:
        driver.quit()
    votes = [json.loads(line) for line in (folder / "votes.jsonl").read_text().splitlines()]
    assert [(v["rater"], v["id"], v["winner"]) for v in votes] == [("ann", 1, "A"), ("ann", 2, "B"),
                                                                     ("ann", 3, "bothbad")]
    assert votes[0]["ratings"] == {"A": {"helpfulness": 4}, "B": {"fluency": 2}} and votes[1]["ratings"] == {}


# ---------------------------------------------------------------- results


def said(model, question):
    """The answer a model gave to a prompt, in the hand-worked A/B test."""
    return f"{model} on q{question}"


def hand_worked(tmp_path):
    """Five tasks on three prompts, m1 and m2 against base, voted on by ann, bob and cy (results' docstring below)."""
    sides = [(0, "m1", "base"), (1, "base", "m1"), (2, "m1", "base"), (0, "base", "m2"), (1, "m2", "base")]
    folder = write_test(tmp_path / "ab", [(q, a, b, said(a, q), said(b, q)) for q, a, b in sides], models=("m1", "m2"))
    write_votes(tmp_path / "ab", [
        ("ann", 1, "A", {"A": {"helpfulness": 5, "safety": 3}, "B": {"fluency": 2}}), ("ann", 2, "B"),
        ("ann", 3, "tie"), ("ann", 4, "A"), ("ann", 5, "bothbad"),
        ("bob", 1, "A"), ("bob", 2, "A", {"A": {d: 4 for d in A.RUBRIC}}), ("bob", 4, "B"), ("cy", 3, "tie")])
    return folder


def test_results_against_hand_computed_numbers(tmp_path, capsys):
    """m1's votes by prompt: q0 ann and bob for m1 (1), q1 ann for m1 and bob for base (½), q2 two ties (½): win rate
    2/3, se = sd(1, ½, ½)/√3 = 1/6. m2: q0 ann for base, bob for m2 (½), q1 both bad (½): ½ ± 0. A won 3 of m1's 4
    decisive votes (0.75 ± sd(1,0,1,1)/2 = 0.25) and 1 of m2's 2 (0.5 ± 0.5). Rubric at the default weights: m1's
    answer (helpfulness 5, safety 3) (0.3·5 + 0.2·3)/0.5 = 4.2; base's answers 2 (fluency alone) and 4: 3 ± 1. Raters
    on tasks 1, 2, 3, 4: agree, disagree, agree (two ties), disagree: 2 of 4, and 1 of the 3 pairs with two sides.
    The judge: m1 wins q0, ties q1, loses q2: ½ ± sd(1, ½, 0)/√3; against the people it agrees with ann and bob on q0
    and with nobody else: 2 of 6 pairs, 2 of 2 where both picked a side."""
    folder = hand_worked(tmp_path)
    judge = tmp_path / "judge.jsonl"
    judge.write_text("".join(json.dumps(E.battle(q, "m1", "base", w, "judge:j", PROMPT, said("m1", q),
                                                 said("base", q), 0.0)) + "\n"
                             for q, w in ((0, "model_a"), (1, "tie"), (2, "model_b"))))
    report = A.results(A.ResultsArgs(dir=folder, battles=[str(judge)]))
    m1, m2 = report["win"]["people"]["m1"], report["win"]["people"]["m2"]
    assert math.isclose(m1["win_rate"], 2 / 3) and math.isclose(m1["win_se"], 1 / 6)
    assert (m1["prompts"], m1["votes"]) == (3, 6) and (m2["win_rate"], m2["win_se"], m2["votes"]) == (0.5, 0.0, 3)
    assert report["position"] == {"m1": (0.75, 0.25, 4), "m2": (0.5, 0.5, 2)}
    assert math.isclose(report["rubric"]["m1"][0], 4.2) and report["rubric"]["m1"][1:] == (0.0, 1)
    assert report["rubric"]["base"] == (3.0, 1.0, 2) and "m2" not in report["rubric"]
    assert report["raters"] == (0.5, 4, 1 / 3, 3)
    j = report["win"]["judge:j"]["m1"]
    assert j["win_rate"] == 0.5 and math.isclose(j["win_se"], 0.5 / math.sqrt(3))
    assert "m2" not in report["win"]["judge:j"]
    assert report["judges"]["judge:j"] == (1 / 3, 6, 1.0, 2)

    printed = capsys.readouterr().out
    assert "| people | m1 | 3 | 6 | 0.67 ± 0.17 | 0.75 ± 0.25 (4) | 4.20 ± 0.00 (1) |" in printed
    assert "| judge:j | m1 | 3 | 3 | 0.50 ± 0.29 | both orders |  |" in printed
    assert "| people | base (baseline) | | | | | 3.00 ± 1.00 (2) |" in printed
    assert "raters agree on 0.50 of 4 pairs of votes on one task, 0.33 of 3 where both picked a side" in printed
    assert "judge:j agrees with the people on 0.33 of 6 (judge, person) pairs of verdicts, 1.00 of 2" in printed

    battles = [json.loads(line) for line in open(os.path.join(folder, "battles.jsonl"))]
    assert len(battles) == 9 and battles[1] | {"tstamp": None, "conversation_a": None, "conversation_b": None} == {
        "question_id": 1, "model_a": "base", "model_b": "m1", "winner": "model_b", "judge": "human:ann", "turn": 1,
        "tstamp": None, "conversation_a": None, "conversation_b": None}
    assert battles[4]["winner"] == "tie (bothbad)" and battles[1]["conversation_b"][-1]["content"] == "m1 on q1"

    # the rubric at other weights: helpfulness alone scores m1's answer 5 and leaves base's fluency-only answer out
    report = A.results(A.ResultsArgs(dir=folder, weights=[1, 0, 0, 0, 0]))
    assert report["rubric"] == {"m1": (5.0, 0.0, 1), "base": (4.0, 0.0, 1)}


def test_bad_input_is_one_line_and_loses_no_vote(tmp_path, capsys):
    folder = hand_worked(tmp_path)
    votes = tmp_path / "ab" / "votes.jsonl"
    whole = votes.read_text()
    run = lambda *argv: fails(capsys, A.results, A.ResultsArgs, ["--dir", folder, *argv])  # noqa: E731

    # a writer killed mid-vote: results and serve both refuse (a vote appended to the cut line would be lost)
    votes.write_text(whole + '{"id": 2, "rater": "c')
    assert "votes.jsonl:10: the last line is cut off" in run()
    with pytest.raises(A.UserError, match="votes.jsonl:10: the last line is cut off"):
        A.make_server(folder, "127.0.0.1", 0)
    assert votes.read_text() == whole + '{"id": 2, "rater": "c'
    # ... and from the command line: exit 2, the one line, no traceback
    cut = subprocess.run([sys.executable, "-m", "nanorlhf.abtest", "results", "--dir", folder], cwd=ROOT,
                         capture_output=True, text=True)
    assert cut.returncode == 2 and cut.stderr.startswith("error: ") and cut.stderr.count("\n") == 1
    assert "Traceback" not in cut.stderr and "votes.jsonl:10" in cut.stderr

    votes.write_text(whole + json.dumps({"id": 99, "rater": "dee", "winner": "A"}) + "\n")
    assert "votes.jsonl:10: task id 99 is not in tasks.jsonl" in run()
    votes.write_text(whole + json.dumps({"id": 2, "rater": "dee", "winner": "C"}) + "\n")
    assert "votes.jsonl:10: winner 'C' is not a side: expected one of A, B, tie, bothbad" in run()
    votes.write_text(whole + json.dumps({"id": 2, "rater": "ann", "winner": "A"}) + "\n")
    assert "votes.jsonl:10: ann voted on task 2 on line 2 already" in run()
    votes.write_text(whole)

    tasks = tmp_path / "ab" / "tasks.jsonl"
    tasks.write_text(tasks.read_text().replace("m1 on q0", "another answer"))
    assert "key.json does not match" in run() and "tasks.jsonl: it was written for other tasks" in run()
    hand_worked(tmp_path)
    assert "--weights: expected 5 numbers" in run("--weights", "1", "2")
    judge = tmp_path / "judge.jsonl"
    judge.write_text(json.dumps(E.battle(0, "m1", "base", "tie", "judge:j", PROMPT, "no", said("base", 0), 0.0)) + "\n")
    assert "judge.jsonl:1: m1's answer to prompt 0 is not the one people saw" in run("--battles", str(judge))
    judge.write_text(json.dumps({"model_a": "m1", "model_b": "base", "winner": "model_c"}) + "\n")
    assert "judge.jsonl:1: expected a battle record" in run("--battles", str(judge))
    assert votes.read_text() == whole and not os.path.exists(os.path.join(folder, "battles.jsonl"))  # nothing written
