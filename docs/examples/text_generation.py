from dashscope import Generation

r = Generation.call(model="llama3.2-11b-vision", prompt="hi", max_tokens=32)  # result_format "text"
print(r.output.text)
r = Generation.call(
    model="llama3.2-11b-vision", messages=[{"role": "user", "content": "hi"}], result_format="message", max_tokens=32
)
print(r.output.choices[0].message.content)  # a string here
