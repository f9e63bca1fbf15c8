#!/usr/bin/env bash
# Download Llama 2 or Llama 3 weights from Meta with the signed URL of Meta's email, resuming broken
# downloads and checking every file against Meta's md5 checklists. Run with -h for the options.
# Portable to macOS's bash 3.2: no associative arrays, no ${x,,}, no empty "${array[@]}" under set -u.

set -euo pipefail

REQUEST_PAGE="https://llama.meta.com/llama-downloads"
LLAMA2_MODELS="7B,13B,70B,7B-chat,13B-chat,70B-chat"
LLAMA3_MODELS="8B,8B-instruct,70B,70B-instruct"

usage() {
    cat <<EOF
Usage: $0 [--url URL] [--models LIST] [--family 2|3] [--target-dir DIR]

Downloads Meta's Llama 2 or Llama 3 weights with the signed URL from Meta's email
(request one at $REQUEST_PAGE). Asks for what is not given.

  --url URL         the signed URL from the email, with its '*'; quote it: '...'  (env LLAMA_URL)
  --models LIST     comma-separated, no spaces, or 'all'                          (env LLAMA_MODELS)
                      Llama 2: $LLAMA2_MODELS
                      Llama 3: $LLAMA3_MODELS
  --family 2|3      the Llama release of the URL; needed only when the names      (env LLAMA_FAMILY)
                    cannot tell (70B exists in both)
  --target-dir DIR  where to put the files (default: the current directory)       (env LLAMA_TARGET_DIR)
  -h, --help        show this help

Uses wget when installed, else curl; checks md5 sums with md5sum, md5 or openssl.
Re-running resumes an interrupted download and keeps finished files.

Example:
  $0 --url 'https://download.llamameta.net/*?Policy=...' --models 8B-instruct --target-dir ~/llama
EOF
}

say() { printf '%s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$1" >&2
    shift
    local line
    for line in "$@"; do printf '  %s\n' "$line" >&2; done
    exit 1
}

lower() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }
trim() {
    local s="$1"
    s="${s#"${s%%[![:space:]]*}"}"
    s="${s%"${s##*[![:space:]]}"}"
    printf '%s' "$s"
}

# Ask on stdin; an empty stdin (CI, cron) ends the script with a hint to use the flag instead.
ask() {
    local prompt="$1" flag="$2" answer
    printf '%s ' "$prompt" >&2
    if ! IFS= read -r answer; then
        say ""
        die "no answer on standard input for: $prompt" "Pass $flag (or its environment variable; see $0 -h)."
    fi
    trim "$answer"
}

# ---------------------------------------------------------------- options and answers

URL="${LLAMA_URL:-}"
MODELS="${LLAMA_MODELS:-}"
FAMILY="${LLAMA_FAMILY:-}"
TARGET_DIR="${LLAMA_TARGET_DIR:-}"

need_value() {
    [ "$2" -ge 2 ] || die "$1 needs a value" "Run $0 -h for the options."
}
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --url) need_value "$1" $#; URL="$2"; shift 2 ;;
        --url=*) URL="${1#*=}"; shift ;;
        --models) need_value "$1" $#; MODELS="$2"; shift 2 ;;
        --models=*) MODELS="${1#*=}"; shift ;;
        --family) need_value "$1" $#; FAMILY="$2"; shift 2 ;;
        --family=*) FAMILY="${1#*=}"; shift ;;
        --target-dir) need_value "$1" $#; TARGET_DIR="$2"; shift 2 ;;
        --target-dir=*) TARGET_DIR="${1#*=}"; shift ;;
        *) die "unknown argument '$1'" "Run $0 -h for the options; quote the URL ('...') so the shell leaves its '*' and '&' alone." ;;
    esac
done

if [ -z "$URL" ]; then
    URL=$(ask "Enter the URL from Meta's email:" "--url")
fi
URL=$(trim "$URL")
# A URL pasted with its quotes keeps them when it is read from a prompt or an environment variable.
URL="${URL#[\"\']}"
URL="${URL%[\"\']}"
case "$URL" in
    http://* | https://*) ;;
    *) die "the URL must start with https:// (got '${URL:0:40}')" \
        "Copy the whole signed URL from Meta's email; a new one is at $REQUEST_PAGE." ;;
esac
case "$URL" in
    *'*'*) ;;
    *) die "the URL has no '*' in it, so the files cannot be addressed" \
        "Paste the URL from Meta's email exactly: it looks like https://download.llamameta.net/*?Policy=...&Signature=...&Key-Pair-Id=..." ;;
esac
URL_HEAD="${URL%%\**}"   # everything before the first '*'
URL_TAIL="${URL#*\*}"    # everything after it: the signature
URL_HOST="${URL#*://}"
URL_HOST="${URL_HOST%%[/?]*}"

if [ -z "$MODELS" ]; then
    MODELS=$(ask "Enter the models to download, comma-separated without spaces (Llama 2: $LLAMA2_MODELS; Llama 3: $LLAMA3_MODELS), or press Enter for all:" "--models")
    [ -n "$MODELS" ] || MODELS=all
fi

case "$(lower "$(trim "$FAMILY")")" in
    '') FAMILY="" ;;
    2 | llama2 | llama-2 | "llama 2") FAMILY=2 ;;
    3 | llama3 | llama-3 | "llama 3") FAMILY=3 ;;
    *) die "unknown Llama family '$FAMILY'" "Use --family 2 for Llama 2 or --family 3 for Llama 3 (the email says which release the URL is for)." ;;
esac

TARGET_DIR="${TARGET_DIR:-.}"

# ---------------------------------------------------------------- model names

# Which families a lower-cased name belongs to: 2, 3, 23 (both), or nothing if unknown.
name_family() {
    case "$1" in
        7b | 13b | 7b-chat | 13b-chat | 70b-chat | llama-2-7b | llama-2-13b | llama-2-70b | \
            llama-2-7b-chat | llama-2-13b-chat | llama-2-70b-chat) echo 2 ;;
        8b | 8b-instruct | 70b-instruct | meta-llama-3-8b | meta-llama-3-8b-instruct | meta-llama-3-70b | \
            meta-llama-3-70b-instruct | 8b_pre_trained | 8b_instruction_tuned | 70b_pre_trained | \
            70b_instruction_tuned) echo 3 ;;
        70b) echo 23 ;;
        *) echo "" ;;
    esac
}

# Sets REMOTE (path in the URL), LOCAL (folder on disk) and SHARDS for a lower-cased name of FAMILY.
resolve_model() {
    local n="$1"
    if [ "$FAMILY" = 2 ]; then
        n="${n#llama-2-}"
        REMOTE="llama-2-$n"
        case "$n" in
            7b | 7b-chat) SHARDS=1 ;;
            13b | 13b-chat) SHARDS=2 ;;
            70b | 70b-chat) SHARDS=8 ;;
        esac
        LOCAL="$REMOTE"
    else
        case "$n" in
            8b | meta-llama-3-8b | 8b_pre_trained) REMOTE=8b_pre_trained LOCAL=Meta-Llama-3-8B SHARDS=1 ;;
            8b-instruct | meta-llama-3-8b-instruct | 8b_instruction_tuned)
                REMOTE=8b_instruction_tuned LOCAL=Meta-Llama-3-8B-Instruct SHARDS=1 ;;
            70b | meta-llama-3-70b | 70b_pre_trained) REMOTE=70b_pre_trained LOCAL=Meta-Llama-3-70B SHARDS=8 ;;
            70b-instruct | meta-llama-3-70b-instruct | 70b_instruction_tuned)
                REMOTE=70b_instruction_tuned LOCAL=Meta-Llama-3-70B-Instruct SHARDS=8 ;;
        esac
    fi
}

# Approximate size in GiB, for the free-space warning.
model_gib() {
    case "$1" in
        llama-2-7b*) echo 13 ;;
        llama-2-13b*) echo 25 ;;
        llama-2-70b*) echo 129 ;;
        Meta-Llama-3-8B*) echo 15 ;;
        *) echo 132 ;;
    esac
}

NAMES=()
IFS=, read -r -a RAW_NAMES <<<"$MODELS"
if [ "$(lower "$(trim "$MODELS")")" = all ]; then
    RAW_NAMES=()
fi
SEEN2="" SEEN3=""
for raw in ${RAW_NAMES[@]+"${RAW_NAMES[@]}"}; do
    name=$(lower "$(trim "$raw")")
    [ -n "$name" ] || continue
    fam=$(name_family "$name")
    case "$fam" in
        '') die "unknown model name '$(trim "$raw")'" \
            "Llama 2 models: $LLAMA2_MODELS" \
            "Llama 3 models: $LLAMA3_MODELS" \
            "Give them comma-separated without spaces, e.g. --models 7B,7B-chat" ;;
        2) SEEN2="$SEEN2 $(trim "$raw")" ;;
        3) SEEN3="$SEEN3 $(trim "$raw")" ;;
    esac
    NAMES+=("$name")
done

if [ ${#NAMES[@]} -eq 0 ] && [ "$(lower "$(trim "$MODELS")")" != all ]; then
    die "no model names in '$MODELS'" "Give them comma-separated without spaces, e.g. --models 7B,7B-chat, or 'all'."
fi
if [ -n "$SEEN2" ] && [ -n "$SEEN3" ]; then
    die "the list mixes Llama 2 models (${SEEN2# }) and Llama 3 models (${SEEN3# })" \
        "A signed URL is for one release: run this script once per release, each with its own URL."
fi
if [ -n "$FAMILY" ]; then
    if [ "$FAMILY" = 2 ] && [ -n "$SEEN3" ]; then
        die "${SEEN3# } is Llama 3, but the family is Llama 2" "Llama 2 models: $LLAMA2_MODELS (or use --family 3 with a Llama 3 URL)."
    fi
    if [ "$FAMILY" = 3 ] && [ -n "$SEEN2" ]; then
        die "${SEEN2# } is Llama 2, but the family is Llama 3" "Llama 3 models: $LLAMA3_MODELS (or use --family 2 with a Llama 2 URL)."
    fi
elif [ -n "$SEEN2" ]; then
    FAMILY=2
elif [ -n "$SEEN3" ]; then
    FAMILY=3
else
    answer=$(ask "Is the URL for Llama 2 or Llama 3 (the email says)? Enter 2 or 3:" "--family 2 or --family 3")
    case "$(lower "$answer")" in
        2 | llama2 | llama-2 | "llama 2") FAMILY=2 ;;
        3 | llama3 | llama-3 | "llama 3") FAMILY=3 ;;
        *) die "'$answer' is not a Llama family" "Answer 2 for Llama 2 or 3 for Llama 3." ;;
    esac
fi

if [ ${#NAMES[@]} -eq 0 ]; then
    if [ "$FAMILY" = 2 ]; then all="$LLAMA2_MODELS"; else all="$LLAMA3_MODELS"; fi
    IFS=, read -r -a NAMES <<<"$(lower "$all")"
fi

# ---------------------------------------------------------------- tools

if command -v wget >/dev/null 2>&1; then
    DOWNLOADER=wget
elif command -v curl >/dev/null 2>&1; then
    DOWNLOADER=curl
else
    die "neither wget nor curl is installed" \
        "Install one: 'brew install wget' on macOS, 'sudo apt-get install wget' on Debian/Ubuntu."
fi

if command -v md5sum >/dev/null 2>&1; then
    MD5_TOOL=md5sum
elif command -v md5 >/dev/null 2>&1; then
    MD5_TOOL=md5
elif command -v openssl >/dev/null 2>&1; then
    MD5_TOOL=openssl
else
    die "no md5 tool found (md5sum, md5 or openssl), so the downloads cannot be checked" \
        "Install coreutils (Linux: 'sudo apt-get install coreutils'; macOS ships 'md5')."
fi

md5_of() {
    local h
    case "$MD5_TOOL" in
        md5sum) h=$(md5sum <"$1") ;;
        md5) h=$(md5 -r <"$1") ;;
        openssl) h=$(openssl md5 <"$1"); h="${h##* }" ;;
    esac
    lower "${h%% *}"
}

mkdir -p "$TARGET_DIR" 2>/dev/null ||
    die "cannot create the target folder '$TARGET_DIR'" "Check the path and its permissions, or choose another with --target-dir."
[ -w "$TARGET_DIR" ] ||
    die "cannot write to the target folder '$TARGET_DIR'" "Fix its permissions or choose another with --target-dir."

LOG=$(mktemp "${TMPDIR:-/tmp}/llama-download.XXXXXX")
trap 'rm -f "$LOG"' EXIT

free_gib() {
    local avail
    avail=$(df -Pk "$1" 2>/dev/null | { read -r _ && read -r _ _ _ a _ && echo "$a"; }) || return 0
    case "$avail" in '' | *[!0-9]*) return 0 ;; esac
    echo $((avail / 1024 / 1024))
}

# ---------------------------------------------------------------- downloading

# wget prints the signed URL unless it is quiet; --show-progress (wget 1.16+) keeps a bar when it is.
WGET_OUTPUT="--progress=bar:force:noscroll"
if [ "$DOWNLOADER" = wget ]; then
    case "$(wget --help 2>&1)" in
        *--show-progress*) WGET_OUTPUT="--quiet --show-progress --progress=bar:force:noscroll" ;;
    esac
fi

# fetch REMOTE_PATH DEST: download into DEST (resuming it if it exists) or end the script with the reason.
fetch() {
    local remote="$1" dest="$2" rc=0 code="" url="$URL_HEAD$1$URL_TAIL"
    if [ "$DOWNLOADER" = wget ]; then
        # shellcheck disable=SC2086  # WGET_OUTPUT is a list of options
        wget --continue $WGET_OUTPUT -O "$dest" "$url" || rc=$?
        [ "$rc" -ne 0 ] || return 0
        [ "$rc" -ne 3 ] || fail_write "$dest"
        # A quiet wget does not say why it failed: ask the server again, with the answer kept off the screen.
        wget --spider --server-response --tries=1 --timeout=30 "$url" >"$LOG" 2>&1 || true
        code=$(grep -o 'HTTP/[0-9.]* [0-9][0-9][0-9]' "$LOG" | tail -n 1) || code=""
        code="${code##* }"
        grep -i -E 'failed|unable|refused|timed out' "$LOG" | grep -v 'Signature=' | tail -n 2 >&2 || true
        case "$rc" in
            4) fail_network "$remote" ;;
            5) fail_tls ;;
            8) fail_http "$remote" "$code" ;;
            *) die "wget failed (exit code $rc) while downloading $remote" "Re-run this script: it resumes where it stopped. If it fails again, run it with curl alone on the PATH to see another message." ;;
        esac
    else
        local attempt=1
        while :; do
            rc=0
            code=$(curl --fail --location --continue-at - --progress-bar --output "$dest" \
                --write-out '%{http_code}' "$url") || rc=$?
            # The connection dropped in the middle of the file: resume it, as wget does by itself.
            case "$rc" in 18 | 52 | 56) [ "$attempt" -lt 5 ] || break ;; *) break ;; esac
            attempt=$((attempt + 1))
            say "The connection dropped; resuming $remote (attempt $attempt of 5)."
        done
        case "$rc" in
            0) return 0 ;;
            22)
                # A resumed file that was already complete: the server has nothing past its end.
                if [ "$code" = 416 ] && [ -s "$dest" ]; then return 0; fi
                fail_http "$remote" "$code" ;;
            33)
                say "The server cannot resume $remote; downloading it again from the start."
                rm -f "$dest"
                fetch "$remote" "$dest"
                return 0 ;;
            23) fail_write "$dest" ;;
            5 | 6 | 7 | 28 | 18 | 52 | 55 | 56) fail_network "$remote" ;;
            35 | 51 | 58 | 59 | 60 | 77 | 83) fail_tls ;;
            *) die "curl failed (exit code $rc) while downloading $remote" "See curl's message above, then re-run this script: it resumes where it stopped." ;;
        esac
    fi
}

fail_http() {
    local remote="$1" code="$2"
    case "$code" in
        403) die "the server refused $remote (HTTP 403 Forbidden): the signed URL has expired or is wrong." \
            "Signed URLs are valid for 24 hours and a limited number of downloads." \
            "Request a new one at $REQUEST_PAGE and paste it exactly (the whole URL, with its '*')." \
            "Also check that the URL is for Llama $FAMILY, the release of the models you chose." \
            "Finished files are kept; re-running resumes the rest." ;;
        404) die "$remote is not on the server (HTTP 404)." \
            "The URL is probably for another Llama release than Llama $FAMILY: use the models of your URL's release," \
            "or request a URL for Llama $FAMILY at $REQUEST_PAGE." ;;
        *) die "the server answered HTTP ${code:-error} for $remote." \
            "Try again in a few minutes (re-running resumes); if it persists, request a new URL at $REQUEST_PAGE." ;;
    esac
}

fail_network() {
    die "network error while downloading $1 from $URL_HOST (see the message above)." \
        "Check your internet connection, proxy (https_proxy) and firewall, then re-run this script:" \
        "finished files are kept and the interrupted one resumes where it stopped."
}

fail_tls() {
    die "secure connection to $URL_HOST failed (TLS/certificate error, see the message above)." \
        "Check the computer's date and time and its CA certificates (e.g. 'sudo apt-get install ca-certificates'), then re-run."
}

fail_write() {
    local free
    free=$(free_gib "${1%/*}")
    die "could not write $1: no space left on device, or the folder is not writable." \
        "Free space there: ${free:-unknown} GiB. Free up space or choose another --target-dir, then re-run:" \
        "finished files are kept and this one resumes where it stopped."
}

# expected_md5 CHECKLIST NAME: the md5 that CHECKLIST (md5sum format) gives for NAME, or nothing.
expected_md5() {
    local line hash name
    [ -f "$1" ] || return 0
    while IFS= read -r line || [ -n "$line" ]; do
        line="${line%$'\r'}"
        hash="${line%% *}"
        name="${line#* }"
        name="${name# }"
        name="${name#\*}"
        name="${name#./}"
        if [ "$name" = "$2" ]; then
            lower "$hash"
            return 0
        fi
    done <"$1"
}

# check_checklist FILE: end the script if FILE is not an md5 checklist (an error page saved by mistake).
check_checklist() {
    local line hash ok=0
    while IFS= read -r line || [ -n "$line" ]; do
        hash="${line%% *}"
        case "$hash" in '' | *[!0-9a-fA-F]*) continue ;; esac
        [ ${#hash} -eq 32 ] && ok=1
    done <"$1"
    [ "$ok" = 1 ] || die "$1 is not an md5 checklist (no '<md5>  <file>' lines)." \
        "Delete it (rm '$1') and re-run this script."
}

BAD=()     # one line per file that failed its checksum
FILES=0

# get REMOTE_PATH LOCAL_PATH [CHECKLIST]: download unless already there, then check against CHECKLIST.
get() {
    local remote="$1" dest="$2" checklist="${3:-}" want="" got base="${2##*/}"
    [ -z "$checklist" ] || want=$(expected_md5 "$checklist" "$base")
    FILES=$((FILES + 1))
    if [ -f "$dest" ]; then
        if [ -n "$want" ]; then
            say "Checking $dest"
            got=$(md5_of "$dest")
            if [ "$got" != "$want" ]; then
                BAD+=("$dest does not match $checklist (md5 $got, expected $want): it is damaged, or unfinished by another script. Delete it (rm '$dest') and re-run this script; to resume an unfinished one instead, rename it to '$dest.part' and re-run.")
            fi
        else
            say "Already have $dest"
        fi
        return 0
    fi
    say "Downloading $dest"
    fetch "$remote" "$dest.part"
    if [ -n "$want" ]; then
        got=$(md5_of "$dest.part")
        if [ "$got" != "$want" ]; then
            mv -f "$dest.part" "$dest.bad"
            BAD+=("$dest failed its checksum (md5 $got, expected $want from $checklist): the download is damaged. It was kept as $dest.bad; delete it (rm '$dest.bad') and re-run this script to download it again.")
            return 0
        fi
    elif [ -n "$checklist" ]; then
        say "warning: $checklist has no entry for $base, so it is not verified."
    fi
    mv -f "$dest.part" "$dest"
}

# ---------------------------------------------------------------- the plan

need=0
for name in "${NAMES[@]}"; do
    resolve_model "$name"
    need=$((need + $(model_gib "$LOCAL")))
done
free=$(free_gib "$TARGET_DIR")
if [ -n "$free" ] && [ "$free" -lt "$need" ]; then
    say "warning: these models take about $need GiB, and $TARGET_DIR has $free GiB free; the download will stop when the disk is full."
    say "         Free up space or choose another --target-dir (already finished files count towards the total)."
fi
say "Downloading Llama $FAMILY (${NAMES[*]}) into $TARGET_DIR with $DOWNLOADER"

T="$TARGET_DIR"
if [ "$FAMILY" = 2 ]; then
    get LICENSE "$T/LICENSE"
    get USE_POLICY.md "$T/USE_POLICY.md"
    get tokenizer_checklist.chk "$T/tokenizer_checklist.chk"
    check_checklist "$T/tokenizer_checklist.chk"
    get tokenizer.model "$T/tokenizer.model" "$T/tokenizer_checklist.chk"
else
    get LICENSE "$T/LICENSE"
    get USE_POLICY "$T/USE_POLICY"
fi

HINTS=()
for name in "${NAMES[@]}"; do
    resolve_model "$name"
    mkdir -p "$T/$LOCAL"
    chk="$T/$LOCAL/checklist.chk"
    get "$REMOTE/checklist.chk" "$chk"
    check_checklist "$chk"
    get "$REMOTE/params.json" "$T/$LOCAL/params.json" "$chk"
    if [ "$FAMILY" = 3 ]; then
        get "$REMOTE/tokenizer.model" "$T/$LOCAL/tokenizer.model" "$chk"
        tok="$T/$LOCAL/tokenizer.model"
    else
        tok="$T/tokenizer.model"
    fi
    s=0
    while [ "$s" -lt "$SHARDS" ]; do
        shard=$(printf 'consolidated.%02d.pth' "$s")
        get "$REMOTE/$shard" "$T/$LOCAL/$shard" "$chk"
        s=$((s + 1))
    done
    case "$LOCAL" in *-chat | *-Instruct) example=example_chat_completion.py ;; *) example=example_text_completion.py ;; esac
    HINTS+=("torchrun --nproc_per_node $SHARDS $example --ckpt_dir $T/$LOCAL/ --tokenizer_path $tok")
done

if [ ${#BAD[@]} -gt 0 ]; then
    printf 'error: %d file(s) failed the md5 check:\n' "${#BAD[@]}" >&2
    for line in "${BAD[@]}"; do printf '  %s\n' "$line" >&2; done
    exit 1
fi

say "Done: $FILES files in $TARGET_DIR, every file with a checklist entry matches its md5."
say "Try it (--nproc_per_node is the model's number of shards):"
for line in "${HINTS[@]}"; do say "  $line"; done
