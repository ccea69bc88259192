"""A blind A/B test for people: each model and a baseline answer the same held-out prompts, raters pick the better of
two unlabelled answers in a browser, and the votes are unblinded into win rates.

    python -m nanorlhf.abtest prepare --baseline out/sft --model out/ppo --data heldout.jsonl --limit 100 --out out/ab
    python -m nanorlhf.abtest serve --dir out/ab          # raters open http://127.0.0.1:8000/
    python -m nanorlhf.abtest results --dir out/ab

The headline measure of Stiennon et al. 2020 and of InstructGPT (Ouyang et al. 2022): people compare two answers to
one prompt without knowing which model wrote which, and the share of prompts a model wins against the baseline is the
result.

prepare   samples the baseline and each model as `nanorlhf.evaluate` does (the same flags and seed draw the same
          responses, so a judge model can be run on the very pairs people see) and writes to --out:
            tasks.jsonl  one comparison a line, {id, prompt, a, b}: a model's answer and the baseline's to one prompt,
                         as A and B. The sides come from --seed so that each model is A on half its prompts (a
                         preference for one side then cancels out), and the tasks are shuffled so that the
                         comparisons of one prompt, which all show the baseline's answer, are seldom next to each
                         other.
            key.json     which model wrote each side, and a hash of tasks.jsonl; the page never reads it.
serve     a page for raters, on the standard library's http.server (a local page needs no framework): a name, then
          one task at a time, picked with a click or a key; optional 1-5 ratings on a rubric; progress, and resume
          where a rater left off (the votes file says which tasks each rater has done). Each vote is appended to
          votes.jsonl and flushed before the page moves on, so a killed server loses none; several raters can vote on
          the same tasks at once. It serves its three routes and nothing else: no file from disk.
results   unblinds the votes with the key into FastChat battle records (battles.jsonl, the format of Chatbot Arena's
          clean battle data that FastChat's Elo scripts read) and prints, for each model against the baseline, the
          win rate (ties count half) ± standard error over prompts, how often the side shown as A won (a position bias
          check: 0.5 is none), the weighted rubric score, and how often two raters of one task agree. With --battles,
          a judge model's records (`python -m nanorlhf.evaluate --judge ... --battles`) get the same rows and their
          agreement with the people on the pairs both judged.
"""
import hashlib
import http.server
import json
import os
import sys
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass

import torch

from . import model as M
from .cli import UserError, arg, main
from .data import load_prompts
from .engine import check_lengths
from .evaluate import WINNERS, Sampling, battle, mean_se, sample
from .formats import read_records

# The rubric raters may score each answer on, 1 (poor) to 5 (excellent), and its default weights.
RUBRIC = {"helpfulness": 0.30, "relevance": 0.25, "safety": 0.20, "fluency": 0.15, "creativity": 0.10}
# A vote's pick, and the FastChat `winner` it becomes: model_a is the model whose answer was A.
PICKS = dict(zip(("A", "B", "tie", "bothbad"), WINNERS))


def paths(folder):
    """(tasks.jsonl, key.json, votes.jsonl) of an A/B test's folder."""
    return tuple(os.path.join(folder, f) for f in ("tasks.jsonl", "key.json", "votes.jsonl"))


# ---------------------------------------------------------------- prepare


@dataclass
class PrepareArgs(Sampling):
    out: str = arg("", "Folder for tasks.jsonl and key.json; raters' votes will go to votes.jsonl beside them.")
    overwrite: bool = arg(False, "Replace the tasks of a folder that holds no votes yet.")


def prepare(args):
    if not (args.model and args.baseline and args.data and args.out):
        raise UserError("--model (one or more), --baseline, --data and --out are required")
    if len(set(args.model)) < len(args.model):
        raise UserError("--model: each model once, please; a model given twice would be compared twice")
    tasks_path, key_path, votes_path = paths(args.out)
    if os.path.exists(votes_path):  # new tasks would give its votes other answers: never
        raise UserError(f"{votes_path} holds the votes on the tasks there; prepare into a new --out")
    if os.path.exists(tasks_path) and not args.overwrite:
        raise UserError(f"{tasks_path} exists; --overwrite replaces it (nobody has voted on it yet)")
    check_lengths(M.load_config(args.baseline, "--baseline"), args.max_prompt_length, args.max_new_tokens)
    base, tokenizer = M.load_model(args.baseline, device=args.device, dtype=args.dtype, flag="--baseline")
    prompts = load_prompts(args.data, tokenizer, args.max_prompt_length, args.format, args.limit,
                           flag="--max-prompt-length")
    answers = {args.baseline: sample(base, tokenizer, prompts, tokenizer, args)[3]}
    for name in args.model:
        model, tok = M.load_model(name, device=args.device, dtype=args.dtype)
        answers[name] = sample(model, tok, prompts, tokenizer, args)[3]
    rng = torch.Generator().manual_seed(args.seed)  # its own stream: the sides never move the samples
    sides = []  # (question_id, model_a, model_b): each model is A on the first half of a random order of prompts
    for name in args.model:
        for rank, q in enumerate(torch.randperm(len(prompts), generator=rng).tolist()):
            sides.append((q, name, args.baseline) if rank % 2 == 0 else (q, args.baseline, name))
    sides = [sides[i] for i in torch.randperm(len(sides), generator=rng).tolist()]
    tasks = "".join(json.dumps({"id": i, "prompt": prompts[q].messages, "a": answers[a][q], "b": answers[b][q]},
                               ensure_ascii=False) + "\n" for i, (q, a, b) in enumerate(sides, 1))
    os.makedirs(args.out, exist_ok=True)
    with open(tasks_path, "w", encoding="utf-8") as f:
        f.write(tasks)
    key = {"baseline": args.baseline, "models": args.model, "seed": args.seed,
           "tasks_sha256": hashlib.sha256(tasks.encode()).hexdigest(),
           "sides": [{"id": i, "question_id": q, "model_a": a, "model_b": b} for i, (q, a, b) in enumerate(sides, 1)],
           "settings": asdict(args) | {"prompts": len(prompts)}}
    with open(key_path, "w") as f:
        json.dump(key, f, indent=1)
    print(f"wrote {len(sides)} tasks ({len(prompts)} prompts, {len(args.model)} model(s) against {args.baseline}) to "
          f"{tasks_path}, and which model wrote each side to {key_path} (keep it from the raters); next: "
          f"python -m nanorlhf.abtest serve --dir {args.out}")
    return key


# ---------------------------------------------------------------- reading what prepare and serve wrote


def read_tasks(folder):
    """{id: task} of the folder's tasks.jsonl, in its order."""
    path = paths(folder)[0]
    if not os.path.isfile(path):
        raise UserError(f"{folder}: no tasks.jsonl there; write it with `python -m nanorlhf.abtest prepare --out "
                        f"{folder}`")
    tasks = {}
    for where, t in read_records(path):
        if not (isinstance(t, dict) and type(t.get("id")) is int and isinstance(t.get("prompt"), list)
                and isinstance(t.get("a"), str) and isinstance(t.get("b"), str)):
            raise UserError(f"{where}: expected a task {{id: int, prompt: [messages], a: str, b: str}}")
        if t["id"] in tasks:
            raise UserError(f"{where}: task id {t['id']} is on an earlier line too")
        tasks[t["id"]] = t
    return tasks


def vote_problem(vote, tasks):
    """What is wrong with a vote (a JSON object from the page or a line of votes.jsonl), or None."""
    if not isinstance(vote, dict):
        return "expected a JSON object"
    rater, task, ratings = vote.get("rater"), vote.get("id"), vote.get("ratings", {})
    if not (isinstance(rater, str) and rater == rater.strip() and 0 < len(rater) <= 80):
        return "a vote needs the rater's name (1-80 characters, no spaces around it)"
    if type(task) is not int or task not in tasks:
        return f"task id {task!r} is not in tasks.jsonl"
    if vote.get("winner") not in PICKS:
        return f"winner {vote.get('winner')!r} is not a side: expected one of {', '.join(PICKS)}"
    if not (isinstance(ratings, dict) and set(ratings) <= {"A", "B"} and all(
            isinstance(r, dict) and set(r) <= set(RUBRIC) and all(type(x) is int and 1 <= x <= 5 for x in r.values())
            for r in ratings.values())):
        return f"ratings must be {{A: {{dimension: 1-5}}, B: ...}} with dimensions among {', '.join(RUBRIC)}"
    return None


def read_votes(path, tasks):
    """The votes in votes.jsonl, each checked against the tasks. Refuses a file whose last line is cut off: a vote
    appended after it would join it and be lost."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")  # not splitlines(): JSON strings may hold U+2028
    if lines[-1]:  # every vote ends with "\n", so whatever follows the last one was cut off
        raise UserError(f"{path}:{len(lines)}: the last line is cut off (its writer was stopped mid-vote); delete "
                        "that line to go on: every vote before it is whole")
    votes, seen = [], {}
    for n, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            vote = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: malformed JSON ({e.msg}, column {e.colno})") from None
        problem = vote_problem(vote, tasks)
        if problem:
            raise UserError(f"{path}:{n}: {problem}")
        if (vote["rater"], vote["id"]) in seen:
            raise UserError(f"{path}:{n}: {vote['rater']} voted on task {vote['id']} on line "
                            f"{seen[vote['rater'], vote['id']]} already")
        seen[vote["rater"], vote["id"]] = n
        votes.append(vote)
    return votes


# ---------------------------------------------------------------- serve


@dataclass
class ServeArgs:
    dir: str = arg("", "The A/B test's folder (prepare's --out): reads tasks.jsonl, appends votes to votes.jsonl.")
    host: str = arg("127.0.0.1", "Address to listen on. The default admits this machine alone; 0.0.0.0 admits raters "
                    "on your network, and anyone else who reaches the port.")
    port: int = arg(8000, "Port to listen on; 0 takes a free one.", ge=0)


class Ballot:
    """The tasks and the votes of one A/B test. A vote is appended to votes.jsonl and flushed before the rater's
    page hears back, under one lock, so that raters voting at once never interleave and a killed server loses no
    vote it acknowledged."""

    def __init__(self, folder):
        self.tasks = read_tasks(folder)
        self.path = paths(folder)[2]
        self.done = {}  # rater -> the ids of the tasks they voted on
        for v in read_votes(self.path, self.tasks):
            self.done.setdefault(v["rater"], set()).add(v["id"])
        self.file = open(self.path, "a", encoding="utf-8")
        self.lock = threading.Lock()

    def next(self, rater):
        """The first task the rater has not voted on (None when done), and the rater's progress."""
        done = self.done.get(rater, set())
        task = next((t for t in self.tasks.values() if t["id"] not in done), None)
        return {"task": task, "done": len(done), "total": len(self.tasks)}

    def add(self, vote):
        """Record a vote; returns (HTTP status, what is wrong with it or None)."""
        problem = vote_problem(vote, self.tasks)
        if problem:
            return 400, problem
        with self.lock:
            done = self.done.setdefault(vote["rater"], set())
            if vote["id"] in done:  # a double click, or a second tab
                return 409, f"{vote['rater']} voted on task {vote['id']} already"
            record = {"id": vote["id"], "rater": vote["rater"], "winner": vote["winner"],
                      "ratings": vote.get("ratings", {}), "tstamp": time.time()}
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.file.flush()
            done.add(vote["id"])
        return 200, None


def make_server(folder, host="127.0.0.1", port=8000):
    """A ThreadingHTTPServer for the A/B test in `folder`, bound and not yet serving; its `ballot` holds the votes."""
    ballot = Ballot(folder)
    page = PAGE.replace("__RUBRIC__", json.dumps(list(RUBRIC))).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/":
                return self.reply(200, page, "text/html; charset=utf-8")
            if url.path == "/api/next":
                rater = urllib.parse.parse_qs(url.query).get("rater", [""])[0]
                return self.json(200, ballot.next(rater)) if rater else self.json(400, {"error": "which rater?"})
            self.json(404, {"error": f"no such page: {url.path}"})

        def do_POST(self):
            if urllib.parse.urlsplit(self.path).path != "/api/vote":
                return self.json(404, {"error": "no such page"})
            # JSON only: a page on another site can post a form here unasked, but not JSON without a preflight
            # request, which this server never answers
            if self.headers.get_content_type() != "application/json":
                return self.json(415, {"error": "send the vote as application/json"})
            length = int(self.headers.get("Content-Length") or 0)
            if length > 1 << 16:
                return self.json(413, {"error": "a vote is smaller than that"})
            try:
                vote = json.loads(self.rfile.read(length))
            except ValueError:
                return self.json(400, {"error": "malformed JSON"})
            status, problem = ballot.add(vote)
            self.json(status, {"error": problem} if problem else ballot.next(vote["rater"]))

        def json(self, status, body):
            self.reply(status, json.dumps(body, ensure_ascii=False).encode(), "application/json; charset=utf-8")

        def reply(self, status, body, content_type):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # one line per request would bury the address printed at the start
            pass

    try:
        server = http.server.ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    server.daemon_threads = True
    server.ballot = ballot
    return server


def serve(args):
    if not args.dir:
        raise UserError("--dir is required: the folder prepare wrote")
    server = make_server(args.dir, args.host, args.port)
    host, port = server.server_address[:2]
    voted = sum(map(len, server.ballot.done.values()))
    print(f"serving {len(server.ballot.tasks)} tasks from {args.dir} ({voted} votes so far) at http://{host}:{port}/ "
          "(Ctrl-C stops; every vote is on disk once the page shows the next task)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.ballot.file.close()


# ---------------------------------------------------------------- results


@dataclass
class ResultsArgs:
    dir: str = arg("", "The A/B test's folder: tasks.jsonl, votes.jsonl and key.json.")
    key: str | None = arg(None, "The key prepare wrote, if you moved it away from the raters (default: --dir's).")
    battles: list[str] = arg([], "A judge model's battle records on the same prompts (`python -m nanorlhf.evaluate "
                             "--judge J --battles FILE` with prepare's flags): its rows beside the people's, and its "
                             "agreement with them.")
    weights: list[float] = arg(list(RUBRIC.values()), "Weights of the rubric's dimensions in the score, in order: "
                               f"{', '.join(RUBRIC)}.")
    out: str | None = arg(None, "Where to write the people's votes as battle records (default: battles.jsonl in "
                          "--dir).")


def read_key(path, tasks_path, tasks):
    """prepare's key, refused unless it was written with these very tasks."""
    if not os.path.isfile(path):
        raise UserError(f"no key at {path}; give --key, the key.json prepare wrote with these tasks")
    try:
        with open(path) as f:
            key = json.load(f)
        digest = key["tasks_sha256"]
        sides = {s["id"]: s for s in key["sides"]}
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not a key prepare wrote (JSON with tasks_sha256 and sides)") from None
    with open(tasks_path, "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() != digest or list(sides) != list(tasks):
            raise UserError(f"{path} does not match {tasks_path}: it was written for other tasks (another prepare?)")
    return key, sides


def read_battles(path):
    """[(where, record)] of a battle-records file, each with the fields results reads."""
    records = read_records(path)
    for where, r in records:
        if not (isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("model_a", "model_b", "judge"))
                and r.get("winner") in WINNERS and type(r.get("question_id")) in (int, str)):
            raise UserError(f"{where}: expected a battle record {{question_id, model_a, model_b, winner: one of "
                            f"{', '.join(WINNERS)}, judge}}")
    return records


def outcome(record):
    """The model a battle record says won, or "tie" (a tie and both bad alike)."""
    return {"model_a": record["model_a"], "model_b": record["model_b"]}.get(record["winner"], "tie")


def agreement(pairs):
    """How often two verdicts on the same pair agree, counted as Zheng et al. 2023 ("Judging LLM-as-a-judge", §4)
    count the agreement of two judges: over all pairs of verdicts (a tie is a verdict, both bad one too), and over
    those where both picked a side. Returns (share, pairs, share, pairs)."""
    decisive = [(x, y) for x, y in pairs if "tie" not in (x, y)]
    share = lambda p: sum(x == y for x, y in p) / len(p) if p else float("nan")  # noqa: E731
    return share(pairs), len(pairs), share(decisive), len(decisive)


def rubric_score(ratings, weights):
    """The weighted mean of one answer's ratings over the dimensions it was rated on, or None."""
    w = {d: weights[d] for d in ratings if weights[d] > 0}
    return sum(w[d] * ratings[d] for d in w) / sum(w.values()) if w else None


def win_rows(records, models, baseline):
    """{model: {win_rate, win_se, prompts, votes}} of battle records against the baseline: each prompt's votes
    averaged first (a win 1, a tie ½), so that three raters of one prompt weigh as one prompt, the unit sampled."""
    rows = {}
    for name in models:
        by_prompt = {}
        for r in records:
            if {r["model_a"], r["model_b"]} == {name, baseline}:
                won = outcome(r)
                by_prompt.setdefault(r["question_id"], []).append(1.0 if won == name else 0.5 if won == "tie" else 0.0)
        if by_prompt:
            win, se = mean_se(torch.tensor([sum(v) / len(v) for v in by_prompt.values()], dtype=torch.float64))
            rows[name] = {"win_rate": win, "win_se": se, "prompts": len(by_prompt),
                          "votes": sum(map(len, by_prompt.values()))}
    return rows


def results(args):
    if not args.dir:
        raise UserError("--dir is required: the folder prepare wrote")
    if len(args.weights) != len(RUBRIC) or min(args.weights) < 0 or sum(args.weights) <= 0:
        raise UserError(f"--weights: expected {len(RUBRIC)} numbers >= 0, not all 0 (for {', '.join(RUBRIC)}), got "
                        f"{' '.join(map(str, args.weights))}")
    weights = dict(zip(RUBRIC, args.weights))
    tasks_path, key_path, votes_path = paths(args.dir)
    tasks = read_tasks(args.dir)
    key, sides = read_key(args.key or key_path, tasks_path, tasks)
    votes = read_votes(votes_path, tasks)
    if not votes:
        raise UserError(f"no votes in {votes_path} yet: raters vote on `python -m nanorlhf.abtest serve --dir "
                        f"{args.dir}`")
    baseline, models = key["baseline"], key["models"]

    people = [battle(sides[v["id"]]["question_id"], sides[v["id"]]["model_a"], sides[v["id"]]["model_b"],
                     PICKS[v["winner"]], f"human:{v['rater']}", tasks[v["id"]]["prompt"], tasks[v["id"]]["a"],
                     tasks[v["id"]]["b"], v.get("tstamp")) for v in votes]

    # the people's answers by (prompt, model), to check a judge's records are about the same answers
    shown = {(s["question_id"], s[m]): tasks[i][side] for i, s in sides.items() for m, side in
             (("model_a", "a"), ("model_b", "b"))}
    judges = {}
    for path in args.battles:
        for where, r in read_battles(path):
            for m, conv in (("model_a", "conversation_a"), ("model_b", "conversation_b")):
                seen, said = shown.get((r["question_id"], r[m])), r.get(conv)
                if isinstance(said, list) and said and isinstance(said[-1], dict) and seen is not None \
                        and said[-1].get("content") != seen:
                    raise UserError(f"{where}: {r[m]}'s answer to prompt {r['question_id']} is not the one people "
                                    f"saw; sample with prepare's flags (key.json's settings)")
            judges.setdefault(r["judge"], []).append(r)
    out = args.out or os.path.join(args.dir, "battles.jsonl")
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(b, ensure_ascii=False) + "\n" for b in people)

    report = {"people": win_rows(people, models, baseline)} | {j: win_rows(rs, models, baseline)
                                                               for j, rs in judges.items()}
    position = {}  # the people's: of the votes that picked a side, the share for A
    for name in models:
        picked = [r["winner"] == "model_a" for r in people if name in (r["model_a"], r["model_b"])
                  and r["winner"] in ("model_a", "model_b")]
        if picked:
            position[name] = (*mean_se(torch.tensor(picked, dtype=torch.float64)), len(picked))
    scores = {}  # each answer's rubric score, by the model that wrote it
    for v in votes:
        for side, ratings in v["ratings"].items():
            s = rubric_score(ratings, weights)
            if s is not None:
                scores.setdefault(sides[v["id"]][f"model_{side.lower()}"], []).append(s)
    rubric = {m: (*mean_se(torch.tensor(s, dtype=torch.float64)), len(s)) for m, s in scores.items()}

    by_task = {}
    for v, r in zip(votes, people):
        by_task.setdefault(v["id"], []).append(outcome(r))
    raters = agreement([(x, y) for o in by_task.values() for i, x in enumerate(o) for y in o[i + 1:]])
    by_pair = {}  # the people's verdicts on each (prompt, pair of models)
    for r in people:
        by_pair.setdefault((r["question_id"], frozenset((r["model_a"], r["model_b"]))), []).append(outcome(r))
    with_people = {j: agreement([(outcome(r), o) for r in rs
                                 for o in by_pair.get((r["question_id"], frozenset((r["model_a"], r["model_b"]))), [])])
                   for j, rs in judges.items()}

    print(table(report, position, rubric, models, baseline))
    if raters[1]:
        print(f"\nraters agree on {fraction(*raters[:2])} pairs of votes on one task, {fraction(*raters[2:])} where "
              f"both picked a side ({sum(len(o) > 1 for o in by_task.values())} tasks have two votes or more)")
    else:
        print("\nno task has two votes yet: agreement between raters needs two raters on one task")
    for j, a in with_people.items():
        print(f"{j} agrees with the people on {fraction(*a[:2])} (judge, person) pairs of verdicts, "
              f"{fraction(*a[2:])} where both picked a side")
    print(f"\nwrote {len(people)} votes as battle records to {out}")
    return {"win": report, "position": position, "rubric": rubric, "raters": raters, "judges": with_people}


def fraction(share, n):
    """An agreement as printed: its share of n pairs, or "0 of 0" where there are none to share."""
    return f"{share:.2f} of {n}" if n else "0 of 0"


def table(report, position, rubric, models, baseline):
    """Markdown: a row per judge (the people, then each judge model) and model; the baseline's rubric row last."""
    lines = [f"| judge | model | prompts | votes | win rate vs {baseline} ± se | A wins ± se (votes) | "
             "rubric score ± se (answers) |", "|---|---|---|---|---|---|---|"]

    def rated(m):
        return f"{rubric[m][0]:.2f} ± {rubric[m][1]:.2f} ({rubric[m][2]})" if m in rubric else ""
    for judge, rows in report.items():
        for m, r in rows.items():
            a = (f"{position[m][0]:.2f} ± {position[m][1]:.2f} ({position[m][2]})" if m in position else "") \
                if judge == "people" else "both orders"
            lines.append(f"| {judge} | {m} | {r['prompts']} | {r['votes']} | {r['win_rate']:.2f} ± {r['win_se']:.2f} "
                         f"| {a} | {rated(m) if judge == 'people' else ''} |")
    lines.append(f"| people | {baseline} (baseline) | | | | | {rated(baseline)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the page

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Which answer is better?</title>
<style>
  body { font: 16px/1.5 system-ui, sans-serif; max-width: 72rem; margin: 0 auto; padding: 1rem 1.5rem;
         color: #1d1d1f; background: #f6f6f4; }
  header { display: flex; justify-content: space-between; align-items: baseline; gap: 1rem; }
  h1 { font-size: 1.3rem; margin: .2rem 0; }
  #progress { color: #555; }
  .box { background: #fff; border: 1px solid #d8d8d4; border-radius: 8px; padding: .8rem 1rem; }
  #prompt { margin: .8rem 0; }
  .role { font-size: .8rem; font-weight: 600; color: #666; text-transform: uppercase; }
  .content, .text { white-space: pre-wrap; overflow-wrap: anywhere; }
  .text { margin-bottom: .9rem; }
  .answers { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
  .answers article { display: flex; flex-direction: column; }  /* the two rubrics line up at the bottom */
  .answers h2 { font-size: 1.1rem; margin: 0 0 .4rem; }
  .rubric { display: grid; grid-template-columns: max-content max-content; gap: .2rem .6rem; margin-top: auto;
            padding-top: .6rem; border-top: 1px dashed #ddd; font-size: .9rem; color: #444; }
  #pick { display: flex; flex-wrap: wrap; gap: .6rem; margin: 1rem 0 .5rem; }
  #pick button { font-size: 1rem; padding: .55rem 1.1rem; border: 1px solid #888; border-radius: 6px;
                 background: #fff; cursor: pointer; }
  #pick button:hover { background: #eef0ff; }
  kbd { font: .8rem monospace; border: 1px solid #aaa; border-radius: 3px; padding: 0 .3rem; margin-left: .5rem; }
  .hint { color: #555; font-size: .9rem; }
  #error { color: #b00020; }
</style>
</head>
<body>
<header><h1>Which answer is better?</h1><span id="progress"></span></header>
<form id="who" class="box">
  <p>Two assistants answered each prompt. You are not told which wrote which: judge the answers alone.</p>
  <label>Your name <input id="name" autocomplete="name" maxlength="80" required></label>
  <button type="submit">Start</button>
</form>
<main id="task" hidden>
  <section id="prompt" class="box" aria-label="Prompt"></section>
  <div class="answers">
    <article class="box"><h2>A</h2><div class="text" id="a"></div><div class="rubric" id="rubric-A"></div></article>
    <article class="box"><h2>B</h2><div class="text" id="b"></div><div class="rubric" id="rubric-B"></div></article>
  </div>
  <div id="pick">
    <button data-winner="A">A is better<kbd>1</kbd></button>
    <button data-winner="B">B is better<kbd>2</kbd></button>
    <button data-winner="tie">Tie<kbd>3</kbd></button>
    <button data-winner="bothbad">Both bad<kbd>4</kbd></button>
  </div>
  <p class="hint">Rate the answers 1 (poor) to 5 (excellent) if you like, then pick: that records your vote and shows
    the next prompt. Voting as <b id="rater"></b> (<a href="/" id="switch">not you?</a>)</p>
</main>
<p id="finished" class="box" hidden>You have voted on every task. Thank you!</p>
<p id="error" role="alert"></p>
<script>
const RUBRIC = __RUBRIC__;
const KEYS = {"1": "A", "a": "A", "2": "B", "b": "B", "3": "tie", "t": "tie", "4": "bothbad", "x": "bothbad"};
const $ = (id) => document.getElementById(id);
let rater = null, task = null, busy = false;

for (const side of ["A", "B"]) {
  for (const dim of RUBRIC) {
    const select = document.createElement("select");
    select.id = `rate-${side}-${dim}`;
    select.dataset.side = side;
    select.dataset.dim = dim;
    for (const v of ["", "1", "2", "3", "4", "5"]) select.add(new Option(v || "-", v));
    select.addEventListener("change", () => select.blur());  // so that the keys pick again
    const label = document.createElement("label");
    label.htmlFor = select.id;
    label.textContent = dim;
    $(`rubric-${side}`).append(label, select);
  }
}

function fail(message) { $("error").textContent = message; }

function turn(message) {
  const div = document.createElement("div"), role = document.createElement("div"), text = document.createElement("div");
  role.className = "role";
  role.textContent = message.role;
  text.className = "content";
  text.textContent = message.content;  // text, never markup: answers are whatever a model wrote
  div.append(role, text);
  return div;
}

function show(body) {
  $("progress").textContent = `${body.done} of ${body.total} done`;
  task = body.task;
  $("task").hidden = !task;
  $("finished").hidden = !!task;
  if (!task) return;
  $("prompt").replaceChildren(...task.prompt.map(turn));
  $("a").textContent = task.a;
  $("b").textContent = task.b;
  for (const s of document.querySelectorAll(".rubric select")) s.value = "";
  window.scrollTo(0, 0);
}

async function call(url, options) {
  try {
    const response = await fetch(url, options), body = await response.json();
    if (response.ok) return show(body);
    fail(body.error);
    if (response.status === 409) await call("/api/next?rater=" + encodeURIComponent(rater));
  } catch (e) {
    fail("the server cannot be reached: " + e.message);
  }
}

async function vote(winner) {
  if (busy || !task) return;
  busy = true;
  fail("");
  if (document.activeElement) document.activeElement.blur();  // Enter must not vote again on the next task
  const ratings = {};
  for (const s of document.querySelectorAll(".rubric select")) {
    if (s.value) (ratings[s.dataset.side] ??= {})[s.dataset.dim] = Number(s.value);
  }
  await call("/api/vote", {method: "POST", headers: {"Content-Type": "application/json"},
                           body: JSON.stringify({rater, id: task.id, winner, ratings})});
  busy = false;
}

function start(name) {
  rater = name.trim();
  if (!rater) return;
  localStorage.setItem("rater", rater);
  $("who").hidden = true;
  $("rater").textContent = rater;
  call("/api/next?rater=" + encodeURIComponent(rater));
}

$("who").addEventListener("submit", (e) => { e.preventDefault(); start($("name").value); });
$("switch").addEventListener("click", () => localStorage.removeItem("rater"));
for (const b of document.querySelectorAll("#pick button")) b.addEventListener("click", () => vote(b.dataset.winner));
document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey || ["INPUT", "SELECT", "TEXTAREA"].includes(e.target.tagName)) return;
  const winner = KEYS[e.key.toLowerCase()];
  if (winner) {
    e.preventDefault();
    vote(winner);
  }
});
const given = new URLSearchParams(location.search).get("rater") || localStorage.getItem("rater");
if (given) start(given); else $("name").focus();
</script>
</body>
</html>
"""

COMMANDS = {"prepare": (prepare, PrepareArgs), "serve": (serve, ServeArgs), "results": (results, ResultsArgs)}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m nanorlhf.abtest {{{','.join(COMMANDS)}}} [--help | flags]\n\n{__doc__}",
              file=sys.stderr)
        sys.exit(2)
    fn, cls = COMMANDS[sys.argv[1]]
    sys.argv[0] = f"python -m nanorlhf.abtest {sys.argv[1]}"  # what --help's usage line shows
    main(fn, cls, sys.argv[2:])
