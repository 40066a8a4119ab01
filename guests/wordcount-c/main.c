/*
 * `wordcount`: a CGI function in C, built for wasm32-wasi with zig's cc.
 * It counts the lines, words and bytes of the request body (like `wc`) and
 * answers in JSON.
 *
 *   curl -d 'one two three' localhost:3000/wordcount
 *   {"lines": 0, "words": 3, "bytes": 13}
 *
 * Built with (see docs/languages.md):
 *   python -m ziglang cc -target wasm32-wasi -O2 -s \
 *       guests/wordcount-c/main.c -o target/guests/wordcount.wasm
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>

int main(void) {
    unsigned long lines = 0, words = 0, bytes = 0;
    int in_word = 0, c;
    while ((c = getchar()) != EOF) {
        bytes++;
        if (c == '\n') {
            lines++;
        }
        if (isspace(c)) {
            in_word = 0;
        } else if (!in_word) {
            in_word = 1;
            words++;
        }
    }
    /* Logs go to stderr; Kelvin forwards them under the invocation's id. */
    fprintf(stderr, "counted %lu bytes\n", bytes);
    printf("Content-Type: application/json\r\n\r\n");
    printf("{\"lines\": %lu, \"words\": %lu, \"bytes\": %lu}\n", lines, words, bytes);
    return 0;
}
