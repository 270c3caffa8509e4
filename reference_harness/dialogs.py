"""The fixed dialogs whose chat completions microllama checks against Meta's `Llama3.chat_completion`: a system
prompt and a user message, a multi-turn conversation, a builtin tool's result after an end-of-message call, and
an assistant turn with a custom tool call (kept in microllama's dict form; `meta.meta_message` gives Meta's)."""

from microllama.chat import system_prompt

CHAT_DIALOGS = [
    [
        {"role": "system", "content": "You are a helpful assistant. Answer in one sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    [
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {"role": "assistant", "content": "The Eiffel Tower, the Louvre and Notre-Dame.", "stop_reason": "end_of_turn"},
        {"role": "user", "content": "What is so great about #1?"},
    ],
    [
        {"role": "system", "content": system_prompt(["brave_search", "wolfram_alpha"])},
        {"role": "user", "content": "What is the 100th decimal of pi?"},
        {
            "role": "assistant",
            "content": "",
            "stop_reason": "end_of_message",
            "tool_calls": [{"tool_name": "wolfram_alpha", "arguments": {"query": "100th decimal of pi"}}],
        },
        {
            "role": "tool",
            "content": '{"queryresult": {"success": true, "pods": [{"title": "Result", "plaintext": "7"}]}}',
        },
    ],
    [
        {"role": "system", "content": system_prompt(custom_tools=True, instructions="You are a helpful assistant.")},
        {"role": "user", "content": "What's the weather in Zürich, in celsius?"},
        {
            "role": "assistant",
            "content": "",
            "stop_reason": "end_of_turn",
            "tool_calls": [{"tool_name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}],
        },
        {"role": "tool", "content": "12 °C, light rain"},
        {"role": "user", "content": "Should I take an umbrella?"},
    ],
]
