IMAGE="data:image/png;base64,$(base64 -w0 red.png)"
curl -N http://127.0.0.1:8000/api/v1/services/aigc/multimodal-generation/generation \
  -H "Authorization: Bearer $DASHSCOPE_API_KEY" -H 'Content-Type: application/json' \
  -H 'X-DashScope-SSE: enable' \
  -d '{"model": "llama3.2-90b-vision-instruct",
       "input": {"messages": [
         {"role": "system", "content": [{"text": "You are a helpful assistant."}]},
         {"role": "user", "content": [{"image": "'"$IMAGE"'"}, {"text": "这是什么?"}]}]},
       "parameters": {"max_tokens": 64}}'
