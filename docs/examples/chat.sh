llamascope chat -a photo.jpg -o max_tokens 32 "what is this?"               # streams the answer, exits 0 (1 on an error)
llamascope chat -a photo.jpg -m llama3.2-11b-vision -o temperature 0 -o max_tokens 32 "how many dogs?"
echo "what colour is it?" | llamascope chat -a photo.jpg --no-stream -o max_tokens 32   # the question from standard input
cat photo.jpg | llamascope chat -a - -o max_tokens 32 "describe it" --json    # the image from standard input; the final response body
