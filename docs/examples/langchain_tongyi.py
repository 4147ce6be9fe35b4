import base64

from langchain_community.chat_models.tongyi import ChatTongyi
from langchain_core.messages import HumanMessage

with open("red.png", "rb") as f:
    image = "data:image/png;base64," + base64.b64encode(f.read()).decode()
llm = ChatTongyi(model="llama3.2-11b-vision", model_kwargs={"max_tokens": 32})  # DASHSCOPE_* as above
answer = llm.invoke([HumanMessage(content=[{"image": image}, {"text": "What is this?"}])])
print(answer.content)
