"""`tunelab serve` for every task: a real uvicorn server on a loopback port serves a tiny
classification run, a tiny NER run, a tiny instruction run and a tiny causal LM at once.
Tagging must equal `tunelab.load(run).predict`, generation `Generator.generate` (and the causal
LM's `generate`); the OpenAI-compatible chat endpoint answers in OpenAI's shapes, streamed or
not; a model asked at another task's endpoint, unsupported OpenAI fields, limits and a full
generation queue get clear 4xx/503 answers."""
import dataclasses
import json
import random
import threading
import time

import httpx
import pytest
from serving import running

import tunelab
from tunelab.cli import build_parser, main
from tunelab.errors import ConfigError
from tunelab.serve.app import ServeSettings, create_app
from tunelab.serve.pool import ModelPool, chat_generator

# -- toy NER data (people after "Mr", places after "in"), as in test_ner_cli.py ---------------
NAMES = ["Smith", "Jones", "Brown", "Taylor", "Wilson", "Evans", "Thomas", "Walker", "Wright"]
FIRST = ["Anna", "John", "Mary", "Paul", "Kate"]
CITIES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Oslo"]
FILLER = ["yesterday", "the", "meeting", "was", "long", "and", "today", "we", "saw", "a",
          "report", "about", "it", "then", "news", "said", "that"]
TAG_TEXTS = ["yesterday Mr John Smith said that the meeting in Paris was long",
             "today we saw Mr Wright", "news about Oslo", "it"]

# -- toy instructions: six fixed questions, each with one answer to learn by heart -------------
ANIMALS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "sheep": "baa",
           "owl": "hoot"}
QUESTIONS = [f"What does the {a} say?" for a in ANIMALS]
ANSWERS = [f"The {a} says {s}." for a, s in ANIMALS.items()]
MAX_NEW = 20

CORPUS = [f"{s} {v} {o} every day ." for s in ("the cat", "a dog", "my friend")
          for v in ("sees", "likes") for o in ("the river", "a small house")]
LIMITS = dict(max_texts=4, max_chars=1000, max_new_tokens=64, threads=1)


def toy_sentence(rng):
    words, tags = [], []
    for _ in range(rng.randint(1, 3)):
        for _ in range(rng.randint(0, 3)):
            words.append(rng.choice(FILLER))
            tags.append("O")
        kind = rng.random()
        if kind < 0.35:
            words += ["Mr", rng.choice(NAMES)]
            tags += ["O", "B-PER"]
        elif kind < 0.6:
            words += ["Mr", rng.choice(FIRST), rng.choice(NAMES)]
            tags += ["O", "B-PER", "I-PER"]
        else:
            words += ["in", rng.choice(CITIES)]
            tags += ["O", "B-LOC"]
    return words, tags


def write_conll(path, n, seed):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words, tags = toy_sentence(rng)
        lines += [f"{w} {t}" for w, t in zip(words, tags)] + [""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


FAST = ["train.precision=fp32", "train.threads=1", "train.tracker=none",
        "train.warmup_ratio=0.0"]


def train_ner(root):
    from tunelab.tiny import build_tiny_model

    rng = random.Random(0)
    bert = build_tiny_model(root / "ner-bert", kind="bert", vocab_size=200, hidden=64,
                            intermediate=128,
                            texts=[" ".join(toy_sentence(rng)[0]) for _ in range(200)])
    run = root / "ner"
    assert main(["train", "task=token_classification", f"model.name={bert}",
                 f"data.train={write_conll(root / 'train.txt', 80, 1)}",
                 f"data.validation={write_conll(root / 'valid.txt', 10, 2)}",
                 "model.max_length=32", "train.batch_size=8", "train.epochs=10",
                 "train.lr=3e-3", "method.name=full", *FAST, f"run_dir={run}"]) == 0
    return run


def train_instruction(root):
    from tunelab.tiny import build_tiny_model

    llama = build_tiny_model(root / "llama", kind="llama", vocab_size=400, hidden=64,
                             intermediate=128,
                             texts=[f"{q} {a}" for q, a in zip(QUESTIONS, ANSWERS)])
    rows = [{"instruction": q, "input": "", "output": a} for q, a in zip(QUESTIONS, ANSWERS)]
    (root / "chat.json").write_text(json.dumps(rows))
    run = root / "chat"
    assert main(["train", "task.name=instruction", f"model.name={llama}",
                 f"data.train={root / 'chat.json'}", f"data.validation={root / 'chat.json'}",
                 "model.max_length=64", "train.batch_size=2", "train.epochs=120",
                 "train.lr=5e-3", "train.eval_every=1000", *FAST, f"run_dir={run}"]) == 0
    return run


def train_causal_lm(root):
    """A tiny GPT-2 (its tokenizer has no chat template) continued on a few sentences."""
    from tunelab.tiny import build_tiny_model

    gpt2 = build_tiny_model(root / "gpt2", kind="gpt2", vocab_size=300, texts=CORPUS)
    (root / "corpus.txt").write_text("\n".join(CORPUS * 5) + "\n")
    run = root / "clm"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNELAB_CACHE", str(root / "cache"))
        assert main(["pretrain", "task=causal_lm", f"model.name={gpt2}",
                     f"data.train={root / 'corpus.txt'}", "model.max_length=32",
                     "train.batch_size=8", "train.max_steps=10", "train.lr=2e-3", *FAST,
                     f"run_dir={run}"]) == 0
    return run


pytestmark = pytest.mark.usefixtures("keep_torch_threads")


@pytest.fixture(scope="module")
def runs(tiny_bert, toy_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_tasks")
    sentiment = root / "sentiment"
    assert main(["train", f"model.name={tiny_bert}", f"data.train={toy_data['train']}",
                 f"data.validation={toy_data['validation']}", "model.max_length=32",
                 "train.batch_size=4", "train.epochs=3", "method.name=lora", "train.lr=5e-3",
                 *FAST, f"run_dir={sentiment}"]) == 0
    return {"sentiment": sentiment, "ner": train_ner(root), "chat": train_instruction(root),
            "clm": train_causal_lm(root)}


@pytest.fixture(scope="module")
def pool(runs):
    pool = ModelPool()
    for name, run in runs.items():
        pool.add(name, run)
    return pool


@pytest.fixture(scope="module")
def generator(runs):
    return tunelab.load(runs["chat"])


@pytest.fixture(scope="module")
def client(pool):
    app = create_app(pool, ServeSettings(**LIMITS))
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def error(r, status, *words):
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    for w in words:
        assert w in message, message


def user(text):
    return [{"role": "user", "content": text}]


def chat(client, **body):
    body = {"model": "chat", "messages": user(QUESTIONS[0]), "temperature": 0,
            "max_tokens": MAX_NEW, **body}
    return client.post("/v1/chat/completions", json=body)


def generate(client, **body):
    return client.post("/v1/generate", json={"model": "chat", **body})


# --------------------------------------------------------------------------------------------


def test_models_lists_every_task_and_its_endpoints(client):
    body = client.get("/v1/models").json()
    models = {m["name"]: m for m in body["models"]}
    assert {name: m["task"] for name, m in models.items()} == {
        "sentiment": "classification", "ner": "token_classification", "chat": "instruction",
        "clm": "causal_lm"}
    assert models["sentiment"]["endpoints"] == ["/v1/classify", "/v1/explain"]
    assert models["ner"]["endpoints"] == ["/v1/tag"]
    assert models["chat"]["endpoints"] == ["/v1/generate", "/v1/chat/completions"]
    assert models["clm"]["endpoints"] == ["/v1/generate"]  # its tokenizer has no chat template
    assert models["sentiment"]["shares_base"] is not None  # an adapter run on a shared base
    assert all(models[n]["shares_base"] is None for n in ("ner", "chat", "clm"))
    assert {"O", "B-PER", "I-PER", "B-LOC"} <= set(models["ner"]["labels"])
    assert models["chat"]["trainable_params"] > 0 and models["chat"]["private_mb"] > 0
    # the shape OpenAI clients list models with
    assert body["object"] == "list"
    assert [(m["id"], m["object"]) for m in body["data"]] == [
        (n, "model") for n in ("sentiment", "ner", "chat", "clm")]
    spec = client.get("/openapi.json").json()
    assert {"/v1/classify", "/v1/tag", "/v1/generate", "/v1/chat/completions"} <= set(
        spec["paths"])
    assert {"TagRequest", "GenerateRequest", "ChatRequest", "ChatCompletion"} <= set(
        spec["components"]["schemas"])


def test_tag_returns_the_predictors_spans_with_character_offsets(client, runs):
    r = client.post("/v1/tag", json={"texts": TAG_TEXTS})  # the only tagging run: no name
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "ner"
    got = r.json()["predictions"]
    want = tunelab.load(runs["ner"]).predict(TAG_TEXTS)
    assert got == [{"entities": w["entities"]} for w in want]
    assert sum(len(p["entities"]) for p in got) >= 2  # the tiny model did learn entities
    for text, p in zip(TAG_TEXTS, got):
        for e in p["entities"]:
            assert text[e["start"]:e["end"]] == e["text"] and 0 < e["score"] <= 1
    # classification still answers beside it, through the same batcher
    r = client.post("/v1/classify", json={"texts": ["the film was great", "dull"]})
    assert r.json()["model"] == "sentiment"
    assert [p["label"] for p in r.json()["predictions"]] == [
        p["label"] for p in tunelab.load(runs["sentiment"]).predict(["the film was great",
                                                                      "dull"])]


def test_generate_equals_the_generator(client, generator, runs):
    want = generator.generate(QUESTIONS[:4], max_new_tokens=MAX_NEW)
    r = generate(client, prompts=QUESTIONS[:4], max_new_tokens=MAX_NEW)
    assert r.status_code == 200, r.text
    assert r.json()["generations"] == [dataclasses.asdict(w) for w in want]
    assert [g["text"] for g in r.json()["generations"]] == ANSWERS[:4]
    assert all(g["finished"] and g["new_tokens"] < MAX_NEW for g in r.json()["generations"])
    # a conversation of one user turn is the same prompt
    r = generate(client, messages=[user(q) for q in QUESTIONS[:2]], max_new_tokens=MAX_NEW)
    assert r.json()["generations"] == [dataclasses.asdict(w) for w in want[:2]]
    # sampling: a seed reproduces the sample, and it is the Generator's for that seed
    sampled = dict(prompts=QUESTIONS[:2], temperature=1.5, seed=3, max_new_tokens=MAX_NEW)
    first, second = generate(client, **sampled).json(), generate(client, **sampled).json()
    assert first == second
    assert first["generations"] == [dataclasses.asdict(g) for g in generator.generate(
        QUESTIONS[:2], max_new_tokens=MAX_NEW, temperature=1.5, seed=3)]
    # max_new_tokens cuts the answer: not finished
    [cut] = generate(client, prompts=QUESTIONS[:1], max_new_tokens=2).json()["generations"]
    assert (cut["finished"], cut["new_tokens"]) == (False, 2)


def test_generate_continues_plain_text_on_a_causal_lm(client, runs):
    lm = tunelab.load(runs["clm"])
    prompts = ["the cat sees", "a dog likes the"]
    r = client.post("/v1/generate", json={"model": "clm", "prompts": prompts,
                                          "max_new_tokens": 8})
    assert r.status_code == 200, r.text
    got = r.json()["generations"]
    assert [g["text"] for g in got] == lm.generate(prompts, max_new_tokens=8)
    assert [g["prompt_tokens"] for g in got] == [
        len(lm.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert all(1 <= g["new_tokens"] <= 8 and (g["finished"] or g["new_tokens"] == 8)
               for g in got)
    # a causal LM chats only with its tokenizer's own template, over the same model
    assert chat_generator(lm) is None
    lm.tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                                  "{% endfor %}{% if add_generation_prompt %}assistant:"
                                  "{% endif %}")
    chat = chat_generator(lm)
    assert chat.model is lm.model and chat.tokenizer is lm.tokenizer
    [reply] = chat.generate([user("the cat sees")], max_new_tokens=4)
    assert reply.prompt_tokens == len(lm.tokenizer("user: the cat sees\nassistant:")["input_ids"])


def test_chat_completion_has_openais_shape_and_usage(client, generator):
    want = generator.generate([user(QUESTIONS[1])], max_new_tokens=MAX_NEW)[0]
    # fields OpenAI clients send that ask for nothing are accepted, unknown ones ignored
    r = chat(client, messages=user(QUESTIONS[1]), user="someone", presence_penalty=0,
             logprobs=False, stop=None, n=1, metadata={"a": "b"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "chat" and abs(body["created"] - time.time()) < 120
    assert body["choices"] == [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": ANSWERS[1]}}]
    assert body["usage"] == {"prompt_tokens": want.prompt_tokens,
                             "completion_tokens": want.new_tokens,
                             "total_tokens": want.prompt_tokens + want.new_tokens}
    # OpenAI content parts read as the text; max_tokens cuts: finish_reason length
    parts = [{"role": "user", "content": [{"type": "text", "text": QUESTIONS[1]}]}]
    assert chat(client, messages=parts).json()["choices"] == body["choices"]
    cut = chat(client, messages=parts, max_completion_tokens=2).json()
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == 2


def test_chat_stream_sends_chunks_that_add_up_to_the_answer(client):
    whole = chat(client, messages=user(QUESTIONS[2])).json()
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "chat", "messages": user(QUESTIONS[2]), "temperature": 0,
            "max_tokens": MAX_NEW, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert {(c["object"], c["id"], c["model"]) for c in chunks} == {
        ("chat.completion.chunk", chunks[0]["id"], "chat")}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert "".join(pieces) == whole["choices"][0]["message"]["content"] == ANSWERS[2]
    assert len([p for p in pieces if p]) > 1  # streamed in pieces, not in one
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_a_model_asked_at_another_tasks_endpoint_gets_400(client):
    error(client.post("/v1/classify", json={"model": "ner", "texts": ["a"]}), 400, "'ner'",
          "token_classification run", "/v1/tag")
    error(client.post("/v1/tag", json={"model": "sentiment", "texts": ["a"]}), 400,
          "classification run", "/v1/classify or /v1/explain")
    error(client.post("/v1/explain", json={"model": "chat", "texts": ["a"]}), 400,
          "instruction run", "/v1/generate or /v1/chat/completions")
    error(generate(client, model="ner", prompts=["a"]), 400, "token_classification")
    error(chat(client, model="sentiment"), 400, "'sentiment'", "classification run")
    error(chat(client, model="clm"), 400, "causal_lm run", "no chat template", "/v1/generate")
    error(generate(client, model="clm", messages=[user("a")]), 400, "no chat template",
          "prompts")
    error(generate(client, model=None, prompts=["a"]), 422, "several are served for "
          "/v1/generate: chat, clm")
    error(chat(client, model="nope"), 404, "'nope'", "sentiment, ner, chat, clm")


def test_unsupported_openai_fields_get_400(client):
    error(chat(client, n=2), 400, "n=2", "one choice")
    error(chat(client, tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools")
    error(chat(client, stop=["\n"]), 400, "stop")
    error(chat(client, logprobs=True), 400, "logprobs")
    error(chat(client, response_format={"type": "json_object"}), 400, "response_format")


def test_limits_and_bad_requests_get_clear_errors(client):
    error(generate(client, prompts=["a"] * 5), 413, "--max-texts", "prompts[4]")
    error(generate(client, prompts=["ok", "x" * 1001]), 413, "prompts[1]", "--max-chars")
    error(generate(client, messages=[user("x" * 1001)]), 413, "messages[0][0].content")
    error(chat(client, messages=user("x" * 1001)), 413, "messages[0].content", "--max-chars")
    error(client.post("/v1/tag", json={"texts": ["a"] * 5}), 413, "--max-texts", "texts[4]")
    error(client.post("/v1/tag", json={"texts": ["x" * 1001]}), 413, "texts[0]")
    error(client.post("/v1/tag", json={"texts": []}), 422, "empty")
    error(generate(client, prompts=["a"], max_new_tokens=65), 422, "max_new_tokens is 65",
          "--max-new-tokens")
    error(chat(client, max_tokens=65), 422, "max_tokens is 65", "64")
    error(generate(client, prompts=["a"], messages=[user("a")]), 422, "exactly one")
    error(generate(client), 422, "exactly one")
    error(generate(client, prompts=["a"], temperature=-1), 422, "temperature")
    error(generate(client, messages=[[{"role": "assistant", "content": "hi"}]]), 422,
          "messages[0]", "roles out of order")
    error(chat(client, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), 422, "not text")
    # the tiny llama reads 128 positions: a long prompt and 64 new tokens do not fit
    long = " ".join(["cat"] * 200)
    error(generate(client, prompts=[long], max_new_tokens=64), 413, "prompts[0]",
          "context of 128 tokens")
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "chat", "messages": user(long), "stream": True}) as r:
        r.read()
    error(r, 413, "messages", "context of 128")  # refused before the stream starts


def test_metrics_count_every_endpoint_and_the_tokens(client):
    client.post("/v1/tag", json={"texts": TAG_TEXTS[:2]})
    chat(client)
    chat(client, model="sentiment")
    text = client.get("/metrics").text
    for endpoint, model in (("/v1/tag", "ner"), ("/v1/chat/completions", "chat")):
        assert (f'tunelab_requests_total{{endpoint="{endpoint}",model="{model}",status="200"}}'
                in text)
    assert ('tunelab_requests_total{endpoint="/v1/chat/completions",model="sentiment",'
            'status="400"}' in text)
    assert 'tunelab_request_seconds_count{endpoint="/v1/generate"}' in text
    assert 'tunelab_batch_texts_count{model="ner"}' in text
    assert 'tunelab_errors_total{type="wrong_task"}' in text
    assert "tunelab_generation_held 0.0" in text
    tokens = [line for line in text.splitlines()
              if line.startswith('tunelab_generated_tokens_total{model="chat"}')]
    assert tokens and float(tokens[0].split()[-1]) > MAX_NEW


def test_full_generation_queue_answers_503_and_tagging_goes_on(pool, generator):
    app = create_app(pool, ServeSettings(generation_queue=1, threads=1))
    lane = app.state.lane
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        lane.pause()  # the worker takes nothing: the first request fills the queue
        try:
            first = {}
            waiting = threading.Thread(target=lambda: first.update(
                r=generate(client, prompts=QUESTIONS[:1], max_new_tokens=MAX_NEW)))
            waiting.start()
            for _ in range(500):
                if lane.held == 1:
                    break
                time.sleep(0.01)
            assert lane.held == 1
            r = generate(client, prompts=QUESTIONS[1:2])
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert "--generation-queue" in r.json()["error"]["message"]
            error(chat(client, stream=True), 503, "--generation-queue")
            r = client.post("/v1/tag", json={"texts": TAG_TEXTS[:1]})  # not held up
            assert r.status_code == 200
        finally:
            lane.resume()
        waiting.join(30)
        assert first["r"].status_code == 200, first["r"].text
        assert first["r"].json()["generations"][0]["text"] == ANSWERS[0]
        assert 'tunelab_errors_total{type="overloaded"} 2.0' in client.get("/metrics").text
        assert lane.held == 0


def test_serve_flags_and_refused_runs(runs, tmp_path, tiny_bert, capsys):
    args = build_parser().parse_args(["serve", "a=b", "--max-new-tokens", "32",
                                      "--generation-queue", "3"])
    assert (args.max_new_tokens, args.generation_queue) == (32, 3)
    defaults = build_parser().parse_args(["serve", "a=b"])
    settings = ServeSettings()
    assert (defaults.max_new_tokens, defaults.generation_queue) == (
        settings.max_new_tokens, settings.generation_queue)
    with pytest.raises(ConfigError, match="--generation-queue must be at least 1"):
        ServeSettings(generation_queue=0)
    assert main(["serve", str(runs["chat"]), "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be at least 1" in capsys.readouterr().err
    # a task no endpoint serves is refused when it is added, naming the tasks served
    (tmp_path / "text.txt").write_text("\n".join(CORPUS * 4) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
        assert main(["pretrain", f"model.name={tiny_bert}", f"data.train={tmp_path / 'text.txt'}",
                     "model.max_length=16", "train.batch_size=8", "train.max_steps=1", *FAST,
                     f"run_dir={tmp_path / 'mlm'}"]) == 0
    capsys.readouterr()
    assert main(["serve", str(tmp_path / "mlm")]) == 2
    assert ("is a mlm run; tunelab serve serves classification, token_classification, "
            "instruction, causal_lm runs") in capsys.readouterr().err
