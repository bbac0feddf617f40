#!/usr/bin/env python3
"""Calls the orchestrator's OpenAI-compatible HTTP API with the official `openai` package
and checks that it returns the same tokens as the gRPC API for the same request: image +
text, greedy and seeded sampling, non-streaming and streaming, and a second turn of the
conversation (re-sent whole, as clients do); unserved fields refused by name,
`models.retrieve`, image tokens in `usage`. Exits non-zero on any failure.

    python3 tests/python/openai_test.py --base-url http://127.0.0.1:8000/v1 \
        --grpc-endpoint 127.0.0.1:50050 --image model/tests/fixtures/images/red_square.png
"""

import argparse
import base64
import importlib
import pathlib
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from client_test import generate_stubs  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--grpc-endpoint", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--api-key", default="unused")
    ap.add_argument("--proto-root", default=str(HERE.parents[1] / "proto"))
    args = ap.parse_args()

    import grpc
    import openai

    image = pathlib.Path(args.image).read_bytes()
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    models = client.models.list().data
    assert len(models) == 1, models
    model = models[0].id

    with tempfile.TemporaryDirectory() as tmp:
        generate_stubs(pathlib.Path(args.proto_root), pathlib.Path(tmp))
        sys.path.insert(0, tmp)
        gen = importlib.import_module("specllava.v1.generation_pb2")
        gen_grpc = importlib.import_module("specllava.v1.generation_pb2_grpc")
        common = importlib.import_module("specllava.v1.common_pb2")
        channel = grpc.insecure_channel(args.grpc_endpoint)
        stub = gen_grpc.GenerationStub(channel)

        def grpc_run(prompt, sampling, session_id="", with_image=True):
            req = gen.GenerateRequest(
                session_id=session_id,
                image=image if with_image and not session_id else b"",
                prompt=prompt,
                params=gen.GenerationParams(max_new_tokens=16, **sampling),
            )
            tokens, summary = [], None
            for msg in stub.Generate(req, timeout=120):
                if msg.WhichOneof("event") == "chunk":
                    tokens.extend(msg.chunk.token_ids)
                else:
                    summary = msg.summary
            return tokens, summary

        def user(prompt, with_image):
            parts = [{"type": "image_url", "image_url": {"url": data_url}}] if with_image else []
            return {"role": "user", "content": parts + [{"type": "text", "text": prompt}]}

        def http_run(messages, sampling, stream):
            kwargs = dict(model=model, messages=messages, max_tokens=16,
                          temperature=sampling["temperature"], seed=sampling["seed"],
                          extra_body={"return_token_ids": True})
            if not stream:
                r = client.chat.completions.create(**kwargs)
                choice = r.choices[0]
                assert r.object == "chat.completion"
                assert r.model_extra["speculation"]["steps"] >= 1, r.model_extra
                return (choice.model_extra["token_ids"], choice.message.content,
                        choice.finish_reason, r.usage)
            tokens, text, finish, usage, spec = [], "", None, None, None
            chunks = client.chat.completions.create(
                stream=True, stream_options={"include_usage": True}, **kwargs)
            for chunk in chunks:
                assert chunk.object == "chat.completion.chunk"
                if chunk.usage is not None:
                    usage = chunk.usage
                for c in chunk.choices:
                    tokens.extend((c.model_extra or {}).get("token_ids") or [])
                    text += c.delta.content or ""
                    if c.finish_reason is not None:
                        finish = c.finish_reason
                        spec = chunk.model_extra["speculation"]
            assert spec is not None and spec["steps"] >= 1, spec
            return tokens, text, finish, usage

        def check(messages, sampling, g_tokens, g_summary, what):
            finish = "length" if g_summary.finish == common.FINISH_REASON_LENGTH else "stop"
            for stream in (False, True):
                tokens, text, fin, usage = http_run(messages, sampling, stream)
                label = f"{what} ({'stream' if stream else 'non-stream'})"
                assert tokens == g_tokens, (label, tokens, g_tokens)
                assert text == g_summary.text, (label, text, g_summary.text)
                assert fin == finish, (label, fin, finish)
                assert usage.completion_tokens == len(g_tokens), (label, usage)
                assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
                print(f"{label}: {len(tokens)} tokens match gRPC: {text!r}")

        greedy = {"temperature": 0.0, "seed": 0}
        seeded = {"temperature": 0.9, "seed": 1234}
        p1, p2 = "What do you see?", "What color is it?"
        for name, sampling in (("greedy", greedy), ("seeded", seeded)):
            g_tokens, g_summary = grpc_run(p1, sampling)
            check([user(p1, True)], sampling, g_tokens, g_summary, f"{name} one turn")
            _, usage_http = http_run([user(p1, True)], sampling, False)[2:]
            assert usage_http.prompt_tokens == g_summary.usage.prompt_tokens, usage_http

        # A second turn: the gRPC session vs. the whole conversation re-sent over HTTP.
        session = stub.CreateSession(gen.CreateSessionRequest(image=image)).session_id
        t1_tokens, t1 = grpc_run(p1, greedy, session_id=session)
        t2_tokens, t2 = grpc_run(p2, greedy, session_id=session)
        stub.CloseSession(common.CloseSessionRequest(session_id=session))
        _, t1_text, _, _ = http_run([user(p1, True)], greedy, False)
        assert t1_text == t1.text, (t1_text, t1.text)
        conversation = [user(p1, True), {"role": "assistant", "content": t1_text}, user(p2, False)]
        check(conversation, greedy, t2_tokens, t2, "greedy second turn")

        # Errors come back in OpenAI's shape, as the client's exception types.
        try:
            client.chat.completions.create(model="no-such-model", messages=[user(p1, False)])
        except openai.NotFoundError as e:
            assert e.body["code"] == "model_not_found", e.body
        else:
            raise AssertionError("an unknown model must fail")
        try:
            client.chat.completions.create(model=model, messages=[user(p1, False)], n=2)
        except openai.BadRequestError as e:
            assert e.body["param"] == "n", e.body
        else:
            raise AssertionError("n = 2 must fail")
        # A field that would change the output and is not served is refused by name, never
        # ignored; one with its no-op value, or a bookkeeping field, is accepted.
        refused = {
            "response_format": {"type": "json_object"},
            "logit_bias": {"5": 10},
            "frequency_penalty": 0.5,
            "presence_penalty": 0.5,
        }
        for field, value in refused.items():
            try:
                client.chat.completions.create(
                    model=model, messages=[user(p1, False)], max_tokens=2, **{field: value})
            except openai.BadRequestError as e:
                assert e.body["param"] == field, e.body
            else:
                raise AssertionError(f"{field}={value!r} must be refused")
        r = client.chat.completions.create(
            model=model, messages=[user(p1, False)], max_tokens=2, frequency_penalty=0,
            response_format={"type": "text"}, user="u-1", metadata={"k": "v"}, store=False)
        assert r.usage.completion_tokens == 2, r.usage
        # models.retrieve, and an image counted as its tokens in usage.
        assert client.models.retrieve(model).id == model
        with_image = client.chat.completions.create(
            model=model, messages=[user(p1, True)], max_tokens=1, temperature=0)
        text_only = client.chat.completions.create(
            model=model, messages=[user(p1, False)], max_tokens=1, temperature=0)
        image_tokens = with_image.usage.prompt_tokens - text_only.usage.prompt_tokens
        assert image_tokens > 1, (with_image.usage, text_only.usage)
        print(f"usage counts an image as {image_tokens} prompt tokens (placeholder included)")
        channel.close()
    print("openai client ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
