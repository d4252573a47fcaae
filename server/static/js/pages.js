// A list the server sends a page at a time (`limit`, `before`, and each
// page's `next_before`), with its "Older" button: loading it again keeps the
// reader's place, the next page follows the list as last loaded, and a load
// that began later always wins over one that began earlier.
import { say } from "./i18n.js";

export class PagedList {
  // `field`: the answer's array; `render(items)` shows them; `more(items)`:
  // whether a load reads on beyond what was shown (besides keeping as many
  // as were shown); `focus`: where the keyboard goes when the button goes.
  constructor({ api, path, field, older, problem, render, focus, more = () => false }) {
    Object.assign(this, { api, path, field, older, problem, render, focus, more });
    this.items = [];
    // The next page's `before`, or null when the list is whole.
    this.nextBefore = null;
    // Each load counts one up: a page that comes after a later load began is
    // not shown (it belongs to the list as it was).
    this.generation = 0;
    this.loading = Promise.resolve();
    older.addEventListener("click", () => this.loadOlder());
  }

  // The first page again, and as many more as were shown (a delete or a new
  // item keeps the reader's place), and on while `more` asks for it.
  load() {
    const generation = ++this.generation;
    const wanted = Math.max(this.items.length, 1);
    this.loading = this.fetchPages(generation, (items) => items.length < wanted || this.more(items));
    return this.loading;
  }

  async fetchPages(generation, readOn) {
    let data = await this.api("GET", this.path);
    let items = data[this.field];
    while (data.next_before && readOn(items) && generation === this.generation) {
      data = await this.api("GET", this.pageAfter(data.next_before));
      items = [...items, ...data[this.field]];
    }
    if (generation !== this.generation) return; // a later load shows its own
    this.nextBefore = data.next_before;
    this.show(items);
  }

  // Show `items` (the list as loaded, or changed in place until the next load).
  show(items) {
    this.items = items;
    this.older.hidden = !this.nextBefore;
    this.render(items);
  }

  pageAfter(before) {
    return `${this.path}?before=${encodeURIComponent(before)}`;
  }

  async loadOlder() {
    // After the load on its way, if any: its last row is where the next page starts.
    await this.loading.catch(() => {});
    if (!this.nextBefore) return;
    say(this.problem, "");
    const generation = this.generation;
    this.older.disabled = true;
    let data = null;
    try {
      data = await this.api("GET", this.pageAfter(this.nextBefore));
    } catch (error) {
      if (error.code === "invalid_field") {
        // Its last row went elsewhere (another tab, the retention purge).
        await this.load().catch(() => say(this.problem, "common.failed"));
      } else {
        say(this.problem, `apiError.${error.code}`, {}, error.fallback || error.message);
      }
    } finally {
      this.older.disabled = false;
    }
    if (data === null) return;
    if (generation !== this.generation) {
      // The list was loaded again meanwhile: the next page of what it shows now.
      await this.loadOlder();
      return;
    }
    this.nextBefore = data.next_before;
    const focused = document.activeElement === this.older;
    this.show([...this.items, ...data[this.field]]);
    // The button goes with the last page: the list keeps the keyboard's place.
    if (focused && this.older.hidden) this.focus.focus();
  }
}
