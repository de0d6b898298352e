"""Chat message validation and rendering with SmolLM2's template and without a template."""

from __future__ import annotations

import copy

import pytest

from molten.tokenization import ChatFormatError, has_chat_template, render_chat, render_chat_text, validate_messages

SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

BOS_TEMPLATE = "{{ bos_token }}{% for message in messages %}[{{ message['role'] }}] {{ message['content'] }}\n{% endfor %}"

STRICT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}{{ raise_exception('Tool messages are not supported') }}{% endif %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
)


def test_render_matches_transformers_tokenization(smollm2_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2? 🤔"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Und auf Deutsch? 日本語でも"},
    ]

    token_ids = render_chat(smollm2_tokenizer, messages)

    encoding = smollm2_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert token_ids == list(encoding["input_ids"])


def test_render_has_one_im_start_per_turn(smollm2_tokenizer):
    im_start = smollm2_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert smollm2_tokenizer.bos_token_id == im_start, "SmolLM2 uses <|im_start|> as its BOS token"

    token_ids = render_chat(smollm2_tokenizer, [{"role": "user", "content": "Hi"}])

    # Default system turn, user turn, assistant generation prompt.
    assert token_ids.count(im_start) == 3
    assert token_ids[0] == im_start
    assert token_ids[1] != im_start


def test_render_text_adds_default_system_prompt(smollm2_tokenizer):
    text = render_chat_text(smollm2_tokenizer, [{"role": "user", "content": "Hi"}])

    assert text == (
        f"<|im_start|>system\n{SMOLLM2_DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_render_without_generation_prompt(smollm2_tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]

    text = render_chat_text(smollm2_tokenizer, messages, add_generation_prompt=False)
    token_ids = render_chat(smollm2_tokenizer, messages, add_generation_prompt=False)

    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
    assert smollm2_tokenizer.decode(token_ids) == text


def test_render_decodes_back_to_text(smollm2_tokenizer):
    messages = [{"role": "user", "content": "Écris un haïku sur la mer 🌊"}]

    text = render_chat_text(smollm2_tokenizer, messages)
    token_ids = render_chat(smollm2_tokenizer, messages)

    assert smollm2_tokenizer.decode(token_ids) == text


def test_text_parts_flattened_like_string_content(smollm2_tokenizer):
    parts = [{"type": "text", "text": "First line."}, {"type": "text", "text": "Second line."}]

    from_parts = render_chat(smollm2_tokenizer, [{"role": "user", "content": parts}])
    from_string = render_chat(smollm2_tokenizer, [{"role": "user", "content": "First line.\nSecond line."}])

    assert from_parts == from_string


def test_developer_message_rendered_as_system(smollm2_tokenizer):
    text = render_chat_text(smollm2_tokenizer, [{"role": "developer", "content": "Answer in French."}])

    assert text.startswith("<|im_start|>system\nAnswer in French.<|im_end|>\n")
    assert SMOLLM2_DEFAULT_SYSTEM not in text


def test_tool_message_rendered(smollm2_tokenizer):
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function"}]},
        {"role": "tool", "content": "Sunny", "tool_call_id": "call_1"},
    ]

    text = render_chat_text(smollm2_tokenizer, messages)

    assert "<|im_start|>assistant\n<|im_end|>\n" in text
    assert "<|im_start|>tool\nSunny<|im_end|>\n" in text


def test_invalid_messages_rejected_before_rendering(smollm2_tokenizer):
    with pytest.raises(ChatFormatError) as error:
        render_chat(smollm2_tokenizer, [{"role": "user", "content": "ok"}, {"role": "robot", "content": "hi"}])

    assert error.value.field == "messages[1].role"


def test_smollm2_has_chat_template(smollm2_tokenizer):
    assert has_chat_template(smollm2_tokenizer)


def test_fallback_format_without_template(make_llama_style_tokenizer):
    tokenizer = make_llama_style_tokenizer()
    assert not has_chat_template(tokenizer)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]

    with_prompt = render_chat_text(tokenizer, messages)
    without_prompt = render_chat_text(tokenizer, messages, add_generation_prompt=False)

    assert with_prompt == "system: Be brief.\nuser: Hi\nassistant:"
    assert without_prompt == "system: Be brief.\nuser: Hi\n"


def test_fallback_adds_tokenizer_bos_once(make_llama_style_tokenizer):
    tokenizer = make_llama_style_tokenizer(add_bos=True)
    messages = [{"role": "user", "content": "Hi"}]

    token_ids = render_chat(tokenizer, messages)

    assert token_ids[0] == tokenizer.bos_token_id
    assert token_ids.count(tokenizer.bos_token_id) == 1
    assert token_ids[1:] == tokenizer.encode("user: Hi\nassistant:", add_special_tokens=False)


def test_fallback_without_bos_adds_none(make_llama_style_tokenizer):
    tokenizer = make_llama_style_tokenizer(add_bos=False)

    token_ids = render_chat(tokenizer, [{"role": "user", "content": "Hi"}])

    assert tokenizer.bos_token_id not in token_ids


def test_template_bos_not_doubled(make_llama_style_tokenizer):
    # The template writes BOS and the tokenizer would add another one when encoding.
    tokenizer = make_llama_style_tokenizer(add_bos=True, chat_template=BOS_TEMPLATE)
    assert tokenizer.encode("x")[0] == tokenizer.bos_token_id

    token_ids = render_chat(tokenizer, [{"role": "user", "content": "Hi"}])

    assert token_ids[0] == tokenizer.bos_token_id
    assert token_ids.count(tokenizer.bos_token_id) == 1


def test_template_error_becomes_chat_format_error(make_llama_style_tokenizer):
    tokenizer = make_llama_style_tokenizer(chat_template=STRICT_TEMPLATE)

    with pytest.raises(ChatFormatError, match="Tool messages are not supported") as error:
        render_chat(tokenizer, [{"role": "tool", "content": "42"}])

    assert error.value.field == "messages"


def test_validate_returns_string_content():
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "ann"},
        {"role": "assistant", "tool_calls": [{"id": "call_1"}]},
    ]
    original = copy.deepcopy(messages)

    validated = validate_messages(messages)

    assert validated == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "a\nb", "name": "ann"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1"}]},
    ]
    assert messages == original, "validate_messages must not modify its input"


def test_validate_accepts_every_role():
    roles = ["system", "user", "assistant", "tool", "developer"]

    validated = validate_messages([{"role": role, "content": ""} for role in roles])

    assert [message["role"] for message in validated] == roles


def test_chat_format_error_is_value_error():
    with pytest.raises(ValueError):
        validate_messages([])


INVALID_MESSAGES = [
    pytest.param([], "messages", "at least one message", id="empty-list"),
    pytest.param(None, "messages", "must be a list", id="none"),
    pytest.param({"role": "user", "content": "hi"}, "messages", "must be a list", id="dict-not-list"),
    pytest.param("hello", "messages", "must be a list", id="string"),
    pytest.param(["hi"], "messages[0]", "must be an object", id="message-not-object"),
    pytest.param([{"content": "hi"}], "messages[0].role", "role is missing", id="missing-role"),
    pytest.param(
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "bot", "content": "c"}],
        "messages[2].role",
        "'bot' is invalid",
        id="unknown-role",
    ),
    pytest.param([{"role": "User", "content": "hi"}], "messages[0].role", "'User' is invalid", id="role-case"),
    pytest.param([{"role": ["user"], "content": "hi"}], "messages[0].role", "is invalid", id="role-not-string"),
    pytest.param(
        [{"role": "system", "content": "s"}, {"role": "user"}], "messages[1].content", "is missing", id="missing-content"
    ),
    pytest.param([{"role": "user", "content": None}], "messages[0].content", "is missing", id="none-content"),
    pytest.param(
        [{"role": "assistant", "content": None, "tool_calls": []}],
        "messages[0].content",
        "is missing",
        id="none-content-empty-tool-calls",
    ),
    pytest.param([{"role": "user", "content": 42}], "messages[0].content", "got int", id="content-int"),
    pytest.param([{"role": "user", "content": {"text": "hi"}}], "messages[0].content", "got dict", id="content-dict"),
    pytest.param([{"role": "user", "content": []}], "messages[0].content", "at least one text part", id="no-parts"),
    pytest.param([{"role": "user", "content": ["hi"]}], "messages[0].content[0]", "must be an object", id="part-str"),
    pytest.param(
        [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]}],
        "messages[0].content[1].type",
        "'image_url' is not supported",
        id="image-part",
    ),
    pytest.param(
        [{"role": "user", "content": [{"text": "a"}]}], "messages[0].content[0].type", "None is not", id="part-no-type"
    ),
    pytest.param(
        [{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text", "got NoneType", id="part-no-text"
    ),
    pytest.param(
        [{"role": "user", "content": [{"type": "text", "text": 5}]}],
        "messages[0].content[0].text",
        "got int",
        id="part-text-int",
    ),
]


@pytest.mark.parametrize(("messages", "field", "message_part"), INVALID_MESSAGES)
def test_validate_rejects_invalid_messages(messages, field, message_part):
    with pytest.raises(ChatFormatError) as error:
        validate_messages(messages)

    assert error.value.field == field
    assert message_part in str(error.value)
