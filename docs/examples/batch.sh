mkdir -p photos && cp red.png photo.jpg photos/
llamascope batch submit photos/ "What colour is this?" --max-tokens 16 -o colours   # waits, with a progress bar
cat colours.csv                                  # custom_id,status,answer,error,finish_reason: a row an image
llamascope batch list                            # this key's batches, newest first
