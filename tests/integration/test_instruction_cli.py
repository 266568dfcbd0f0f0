"""Instruction tuning end to end on a tiny Llama built in code: check, train (full, then LoRA on
the tuned model), eval, predict, generate and chat through the CLI; answers learnt, generation
stops at eos, a reloaded run generates the same."""
import io
import json
from pathlib import Path

import pytest

import tunelab
from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.generate import Generator

ANIMALS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "sheep": "baa",
           "owl": "hoot"}
ROTATED = dict(zip(ANIMALS, [*list(ANIMALS.values())[1:], list(ANIMALS.values())[0]]))
FORMS = ["What does the {a} say?", "Which sound does a {a} make?", "Tell me what a {a} says.",
         "The {a} says what?"]
MAX_NEW = 20


def answer(animal, sounds):
    return f"The {animal} says {sounds[animal]}."


def question(animal):
    return FORMS[0].format(a=animal)


def write_data(folder: Path, sounds: dict) -> dict:
    train = [{"instruction": f.format(a=a), "input": "", "output": answer(a, sounds)}
             for f in FORMS for a in sounds]
    train.append({"instruction": "What does the fox say?"})  # no output: dropped, reported
    (folder / "train.json").write_text(json.dumps(train, indent=1))
    (folder / "val.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": question(a)},
                                 {"role": "assistant", "content": answer(a, sounds)}]}) + "\n"
        for a in sounds))
    return {"train": str(folder / "train.json"), "validation": str(folder / "val.jsonl")}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from tunelab.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("instruction")
    (root / "first").mkdir()
    (root / "rotated").mkdir()
    texts = [q.format(a=a) + " " + answer(a, ANIMALS) for q in FORMS for a in ANIMALS]
    model = build_tiny_model(root / "llama", kind="llama", texts=texts, vocab_size=400,
                             hidden=64, intermediate=128)
    return {"root": root, "model": str(model), "first": write_data(root / "first", ANIMALS),
            "rotated": write_data(root / "rotated", ROTATED)}


def recipe(model: str, data: dict, run_dir: Path, *extra: str) -> list[str]:
    return ["task.name=instruction", f"model.name={model}", f"data.train={data['train']}",
            f"data.validation={data['validation']}", "model.max_length=64",
            "train.batch_size=4", "train.warmup_ratio=0", "train.precision=fp32",
            "train.threads=1", "train.tracker=none", "train.log_every=5", f"run_dir={run_dir}",
            *extra]


@pytest.fixture(scope="module")
def full_run(toy):
    run = toy["root"] / "full"
    assert main(["train", *recipe(toy["model"], toy["first"], run, "train.lr=5e-3",
                                  "train.epochs=80", "train.eval_every=120")]) == 0
    return run


def validation_losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r.get("split") == "validation"]


def base_loss(model: str, data: dict) -> float:
    """Validation loss of a model before tuning, computed as the runs compute theirs."""
    metrics, _, _ = Generator.from_pretrained(model, max_length=64, precision="fp32") \
        .evaluate_file(data["validation"])
    return metrics["loss"]


def test_check_shows_the_loss_tokens_and_what_was_dropped(toy, capsys):
    assert main(["check", *recipe(toy["model"], toy["first"], toy["root"] / "unused")]) == 0
    out = capsys.readouterr().out
    assert "24 conversations (24 alpaca), 24 responses" in out
    assert "missing output: 1" in out and "train.json record 25 field 'output'" in out
    assert "«The cat says meow.<|im_end|>»" in out  # the response + eos, marked
    assert "<|im_start|>user\n  What does the cat say?<|im_end|>" in out  # the prompt: not


def test_full_fine_tuning_learns_the_answers_and_stops(full_run, toy):
    for name in ("model/model.safetensors", "model/tokenizer.json", "results.json",
                 "preflight.json", "label_map.json"):
        assert (full_run / name).exists(), name
    preflight = json.loads((full_run / "preflight.json").read_text())
    assert preflight["dropped"] == {"missing output": 1}
    assert preflight["splits"]["train"]["styles"] == {"alpaca": 24}
    losses = validation_losses(full_run)
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert losses[-1] < base_loss(toy["model"], toy["first"]) / 50
    results = json.loads((full_run / "results.json").read_text())["validation"]
    assert results["accuracy"] == 1.0 and results["perplexity"] < 1.1

    generator = tunelab.load(full_run)
    assert isinstance(generator, Generator)
    outputs = generator.generate([question(a) for a in ANIMALS], max_new_tokens=MAX_NEW)
    assert [o.text for o in outputs] == [answer(a, ANIMALS) for a in ANIMALS]
    assert all(o.finished and o.new_tokens < MAX_NEW for o in outputs)
    # left-padded batches give what each prompt gives alone
    assert [generator.generate([question(a)])[0] for a in ANIMALS] == outputs
    with pytest.raises(TunelabError, match="bad prompt: roles out of order"):
        generator.generate([[{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello"}]])


def test_lora_on_the_tuned_model_learns_new_answers(full_run, toy, tmp_path):
    run = tmp_path / "lora"
    assert main(["train", *recipe(str(full_run), toy["rotated"], run, "method.name=lora",
                                  "train.lr=1e-2", "train.epochs=30", "train.eval_every=45")]) == 0
    assert (run / "adapter" / "weights.safetensors").exists() and not (run / "model").exists()
    losses = validation_losses(run)
    assert losses[-1] < base_loss(str(full_run), toy["rotated"]) / 50, losses

    first, second = tunelab.load(run), tunelab.load(run)
    prompts = [question(a) for a in ANIMALS]
    outputs = first.generate(prompts, max_new_tokens=MAX_NEW)
    assert [o.text for o in outputs] == [answer(a, ROTATED) for a in ANIMALS]
    assert all(o.finished for o in outputs)
    assert second.generate(prompts, max_new_tokens=MAX_NEW) == outputs  # save -> load
    sampled = [g.generate(prompts, max_new_tokens=MAX_NEW, temperature=1.5, seed=3)
               for g in (first, second)]
    assert sampled[0] == sampled[1]


def test_eval_predict_generate_and_chat_commands(full_run, toy, tmp_path, capsys,
                                                 monkeypatch):
    assert main(["eval", str(full_run), "--data", toy["first"]["validation"],
                 "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    results = json.loads((full_run / "results.json").read_text())["validation"]
    # eval lays fp32 weights out for oneDNN where training's evaluation did not: rounding only
    assert metrics["loss"] == pytest.approx(results["loss"], rel=1e-5)
    assert "perplexity" in capsys.readouterr().out

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "instruction": question(a)}) + "\n"
                               for i, a in enumerate(ANIMALS)))
    assert main(["predict", str(full_run), "--input", str(prompts), "--output",
                 str(tmp_path / "out.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(len(ANIMALS)))
    assert [r["generated"] for r in rows] == [answer(a, ANIMALS) for a in ANIMALS]
    assert all(r["finished"] for r in rows)

    capsys.readouterr()
    assert main(["generate", str(full_run), "--prompt", question("cat"), "--prompt",
                 question("owl")]) == 0
    captured = capsys.readouterr()
    assert answer("cat", ANIMALS) in captured.out and answer("owl", ANIMALS) in captured.out
    assert captured.err.count("stopped at eos") == 2
    assert main(["generate", toy["model"], "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    assert "3 new tokens" in capsys.readouterr().err  # the untrained base rambles on

    monkeypatch.setattr("sys.stdin", io.StringIO(
        f"{question('cat')}\n/reset\n{question('dog')}\n/exit\n{question('cow')}\n"))
    assert main(["chat", str(full_run)]) == 0
    assert capsys.readouterr().out == (f"{answer('cat', ANIMALS)}\n(history cleared)\n"
                                       f"{answer('dog', ANIMALS)}\n")


def test_chat_keeps_the_history_until_reset(full_run, monkeypatch):
    generator = tunelab.load(full_run)
    seen, generate = [], generator.generate

    def recording(prompts, *args, **kwargs):
        seen.append([m["content"] for m in prompts[0]])
        return generate(prompts, *args, **kwargs)

    monkeypatch.setattr(generator, "generate", recording)
    out = io.StringIO()
    generator.chat(io.StringIO(f"{question('cat')}\n\n{question('dog')}\n/reset\n"
                               f"{question('cow')}\n"), out, max_new_tokens=3)
    cut = "The cat says"  # three tokens of the answer
    assert seen == [[question("cat")], [question("cat"), cut, question("dog")],
                    [question("cow")]]
    lines = out.getvalue().splitlines()
    assert lines[:2] == [cut, "[cut at 3 new tokens]"] and lines[4] == "(history cleared)"


def test_chat_streams_on_a_terminal(full_run):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    tunelab.load(full_run).chat(Terminal(f"{question('duck')}\n/exit\n"), out)
    assert out.getvalue() == (f"chat with {full_run}: /reset clears the history, /exit (or "
                              f"Ctrl-D) quits\n\n> {answer('duck', ANIMALS)}\n\n> ")
