KEY=$(llamascope keys create --name alice --model llama3.2-11b-vision --allowance 1000000 --days 180)  # prints the key
llamascope keys create --name batch --rpm 60 --tpm 200000 --concurrency 4   # every model ('*')
llamascope keys list                 # keys (prefix only), state, expiry, limits, grants, tokens used
llamascope keys grant "$KEY" --model llama3.2-90b-vision-instruct --allowance unlimited
llamascope keys revoke "$KEY"        # by the key, its id (as `keys list` shows it) or any unambiguous prefix
llamascope usage --days 7            # requests (ok, cancelled, failed) and tokens per day, key and model
llamascope usage --requests 20       # the 20 newest requests, each with its status or error code
