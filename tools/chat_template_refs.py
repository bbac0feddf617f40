"""Writes model/tests/fixtures/chat_templates.json: conversations rendered by `transformers`'
`apply_chat_template` with the chat templates of the committed demo pair (`models/target`,
`models/draft`) and with `model/tests/fixtures/templates/*.jinja` (Hugging Face dialect:
`{% generation %}`, `.upper()`, `selectattr`, whitespace control), for the Rust template tests
(`model/tests/chat_templates.rs`). Run with the pinned tools environment:

    python tools/chat_template_refs.py
"""

import json
import pathlib

from transformers import AutoProcessor, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "model/tests/fixtures/chat_templates.json"


def user(text, image=False):
    parts = [{"type": "image"}] if image else []
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


CONVERSATIONS = {
    "one_turn": [user("What is this?", image=True)],
    "two_turns": [user("What shape is it?", image=True), assistant("a red square"),
                  user("What color is it?")],
    "three_turns_two_images": [user("Describe it.", image=True), assistant("Two shapes."),
                               user("And this one?", image=True), assistant("A circle."),
                               user("Which is larger?")],
    "string_content": [{"role": "user", "content": "Hello there"}],
    "system_prompt": [{"role": "system", "content": "Answer briefly."}, user("What is it?", image=True)],
}


def main():
    cases = []
    for name in ("target", "draft"):
        processor = AutoProcessor.from_pretrained(ROOT / "models" / name)
        for conv_name, messages in CONVERSATIONS.items():
            for gen in (True, False):
                cases.append({
                    "template": f"models/{name}",
                    "conversation": conv_name,
                    "messages": messages,
                    "add_generation_prompt": gen,
                    "text": processor.apply_chat_template(messages, add_generation_prompt=gen),
                })
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "models/target")
    for path in sorted((ROOT / "model/tests/fixtures/templates").glob("*.jinja")):
        template = path.read_text()
        for conv_name, messages in CONVERSATIONS.items():
            for gen in (True, False):
                cases.append({
                    "template": str(path.relative_to(ROOT)),
                    "conversation": conv_name,
                    "messages": messages,
                    "add_generation_prompt": gen,
                    "text": tokenizer.apply_chat_template(
                        messages, chat_template=template, tokenize=False, add_generation_prompt=gen),
                })
    OUT.write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} cases to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
