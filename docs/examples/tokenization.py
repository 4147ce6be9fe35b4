import dashscope

r = dashscope.Tokenization.call(
    model="llama3.2-11b-vision", messages=[{"role": "user", "content": "How many tokens is this?"}]
)
print(r.usage["input_tokens"], r.output["token_ids"][:8])  # what a generation request with this input counts
