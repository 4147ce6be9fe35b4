ADMIN="Authorization: Bearer $LLAMASCOPE_ADMIN_KEY"
KEY=$(curl -sS --fail-with-body http://127.0.0.1:8000/admin/keys -H "$ADMIN" -H 'Content-Type: application/json' \
  -d '{"name": "carol", "model": "llama3.2-11b-vision", "allowance": 200000, "rpm": 60}' | jq -r .data.api_key)
curl -sS --fail-with-body http://127.0.0.1:8000/admin/keys/$KEY/grants -H "$ADMIN" -H 'Content-Type: application/json' \
  -d '{"model": "llama3.2-90b-vision-instruct", "allowance": "unlimited"}'
curl -sS --fail-with-body http://127.0.0.1:8000/admin/keys -H "$ADMIN"                         # every key, its grants
curl -sS --fail-with-body "http://127.0.0.1:8000/admin/usage?days=7&requests=5" -H "$ADMIN"   # the newest requests
