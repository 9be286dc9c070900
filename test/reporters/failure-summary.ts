// A second reporter for `npm test`, beside TAP: after the run it lists every failed test with
// its suites, file and error. A CI log is often kept only as its tail, and TAP prints a
// failure where it happens, hundreds of suites above the summary; this puts the failures
// under it. A run without failures prints nothing, so a passing log is TAP alone.
import { relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { TestEvent } from 'node:test/reporters';

const STACK_LINES = 16;
/** Of a whole file's failure (it crashed, or exited before its tests ended), the last of its stderr says why. */
const STDERR_TAIL_CHARS = 2000;

interface Failure {
  where: string;
  title: string;
  error: string;
}

export default async function* failureSummary(source: AsyncIterable<TestEvent>): AsyncGenerator<string, void> {
  const suitesByFile = new Map<string, string[]>();
  const stderrByFile = new Map<string, string>();
  const failures: Failure[] = [];
  for await (const event of source) {
    if (event.type === 'test:stderr') {
      const file = event.data.file ?? '';
      stderrByFile.set(file, ((stderrByFile.get(file) ?? '') + event.data.message).slice(-STDERR_TAIL_CHARS));
    } else if (event.type === 'test:start') {
      const path = suitesByFile.get(event.data.file ?? '') ?? [];
      path.length = event.data.nesting;
      path.push(event.data.name);
      suitesByFile.set(event.data.file ?? '', path);
    } else if (event.type === 'test:fail' && !onlyItsSubtestsFailed(event.data.details.error)) {
      const path = suitesByFile.get(event.data.file ?? '') ?? [];
      failures.push({
        where: location(event.data.file, event.data.line, event.data.column),
        title: [...path.slice(0, event.data.nesting), event.data.name].join(' > '),
        error: errorText(event.data.details.error) + (event.data.name === event.data.file ? stderrTail(stderrByFile.get(event.data.file)) : ''),
      });
    }
  }
  if (failures.length === 0) return;
  yield `\nFAILED (${failures.length}), each with its suites, file and error:\n`;
  for (const failure of failures) {
    yield `\n- ${failure.title}\n  at ${failure.where}\n${indent(failure.error)}\n`;
  }
}

// A suite fails when one of its tests does; that test is listed already.
function onlyItsSubtestsFailed(error: unknown): boolean {
  return (error as { failureType?: unknown }).failureType === 'subtestsFailed';
}

function location(file: string | undefined, line: number | undefined, column: number | undefined): string {
  if (file === undefined) return '(no file)';
  const path = file.startsWith('file:') ? fileURLToPath(file) : file;
  return `${relative(process.cwd(), path)}:${line ?? '?'}:${column ?? '?'}`;
}

// The runner wraps what a test threw in an ERR_TEST_FAILURE whose cause is the thrown value.
function errorText(error: unknown): string {
  const { failureType, cause } = error as { failureType?: string; cause?: unknown };
  const thrown = (cause ?? error) as { stack?: unknown; message?: unknown } | null | undefined;
  const text = String(thrown?.stack ?? thrown?.message ?? thrown);
  const kind = failureType === undefined ? '' : `[${failureType}] `;
  return kind + text.split('\n').slice(0, STACK_LINES).join('\n');
}

function stderrTail(stderr: string | undefined): string {
  return stderr ? `\nits stderr, last ${STDERR_TAIL_CHARS} characters at most:\n${stderr.trimEnd()}` : '';
}

function indent(text: string): string {
  return text.split('\n').map((line) => `    ${line}`).join('\n');
}
