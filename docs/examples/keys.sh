llamascope keys create --name alice --model llama3.2-11b-vision --allowance 1000000 --days 180
llamascope keys create --name batch --rpm 60 --tpm 200000 --concurrency 4   # every model ('*')
llamascope keys list                 # keys (prefix only), state, expiry, limits, grants, tokens used
llamascope keys grant 1 --model llama3.2-90b-vision-instruct --allowance unlimited
llamascope keys revoke 2             # by id, by the key itself, or by any unambiguous prefix
llamascope usage --days 7            # requests (ok, cancelled, failed) and tokens per day, key and model
llamascope usage --requests 20       # the 20 newest requests, each with its status or error code
