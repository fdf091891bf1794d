#!/usr/bin/env bash
# `zlink send` / `zlink listen` / `zlink publish` / `zlink subscribe` driven from a shell, the way a
# terminal agent would use them. Run by test_messaging.py::test_send_and_listen_from_a_shell_script.
#
# Environment: ZLINK_BIN (the zlink command), ALICE and BOB (join strings), BOB_NAME (bob's key
# name), OUT (a directory for what the commands print). Join strings travel in the environment
# only (ZLINK_JOIN, or --join "$VAR"), never in a file. Every check prints one "name=value" line
# (exit codes) on stdout; the test reads them and the files in $OUT.

set -u
Z="$ZLINK_BIN"

# 1. a listener in the background (--once --json), then a JSON value sent to it
ZLINK_JOIN="$BOB" "$Z" listen --once --json >"$OUT/listen_json.out" 2>"$OUT/listen_json.err" &
listener=$!
ZLINK_JOIN="$ALICE" "$Z" send --to "$BOB_NAME" '{"task": "review", "pr": 42}' >"$OUT/send_json.out" 2>&1
echo "send_json=$?"
wait "$listener"
echo "listen_json=$?"

# 2. text from stdin ('-'), the join string from --join, printed as "sender> text"
ZLINK_JOIN="$BOB" "$Z" listen --once >"$OUT/listen_text.out" 2>"$OUT/listen_text.err" &
listener=$!
printf 'hello from stdin' | "$Z" send --join "$ALICE" --to "$BOB_NAME" - >"$OUT/send_stdin.out" 2>&1
echo "send_stdin=$?"
wait "$listener"
echo "listen_text=$?"

# 3. JSON from stdin, to a listener that starts only afterwards (the broker holds it meanwhile)
echo '{"from_stdin": [1, 2, 3]}' | ZLINK_JOIN="$ALICE" "$Z" send --to "$BOB_NAME" --ttl 30 - \
    >"$OUT/send_held.out" 2>&1 &
sender=$!
sleep 1
ZLINK_JOIN="$BOB" "$Z" listen --once --json --timeout 20 >"$OUT/listen_held.out" 2>"$OUT/listen_held.err"
echo "listen_held=$?"
wait "$sender"
echo "send_held=$?"

# 4. nobody by that name connects within the TTL: exit 1, and why on stderr
ZLINK_JOIN="$ALICE" "$Z" send --ttl 1 --to nobody-at-all 'is anyone there?' >"$OUT/send_nobody.out" \
    2>"$OUT/send_nobody.err"
echo "send_nobody=$?"

# 5. a topic: subscribe --once --json in the background, publish until it has heard one
ZLINK_JOIN="$BOB" "$Z" subscribe builds --once --json >"$OUT/subscribe.out" 2>"$OUT/subscribe.err" &
subscriber=$!
publish_rc=none
for _ in $(seq 1 40); do
    ZLINK_JOIN="$ALICE" "$Z" publish builds 'main is green' >>"$OUT/publish.out" 2>&1
    publish_rc=$?
    kill -0 "$subscriber" 2>/dev/null || break
    sleep 0.2
done
echo "publish=$publish_rc"
if kill -0 "$subscriber" 2>/dev/null; then
    kill "$subscriber"
fi
wait "$subscriber"
echo "subscribe=$?"
echo "done=1"
