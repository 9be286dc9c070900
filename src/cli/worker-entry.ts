// The module cluster forks for each proxy worker (src/workers.ts): main()
// sees it runs as a cluster worker and takes its orders over IPC, not argv.
import { launch } from './launch.js';

await launch([]);
