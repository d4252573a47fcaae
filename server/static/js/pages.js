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
    this.olderOnItsWay = false;
    // The key of what this list last said under itself (null: nothing).
    this.told = null;
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
    this.forget(); // the list is whole again: an older page's error is past
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
    // One page at a time: a double click, or a click while the page is on
    // its way, asks once. The button stays enabled (a disabled button loses
    // the keyboard's focus) and says it is busy.
    if (this.olderOnItsWay) return;
    this.olderOnItsWay = true;
    this.older.setAttribute("aria-disabled", "true");
    try {
      await this.nextPage();
    } finally {
      this.olderOnItsWay = false;
      this.older.removeAttribute("aria-disabled");
    }
  }

  async nextPage() {
    // After the loads on their way (another may begin while one is awaited):
    // the last row of the list they show is where the next page starts.
    let loading;
    do {
      loading = this.loading;
      await loading.catch(() => {});
    } while (loading !== this.loading);
    if (!this.nextBefore) return;
    this.forget();
    const generation = this.generation;
    let data;
    try {
      data = await this.api("GET", this.pageAfter(this.nextBefore));
    } catch (error) {
      if (error.code === "invalid_field") {
        // Its last row went elsewhere (another tab, the retention purge).
        await this.load().catch(() => this.tell("common.failed"));
      } else if (!error.code) {
        this.tell("common.failed"); // no answer at all: the connection
      } else {
        this.tell(`apiError.${error.code}`, error.fallback || error.message);
      }
      return;
    }
    if (generation !== this.generation) {
      // The list was loaded again meanwhile: the next page of what it shows now.
      await this.nextPage();
      return;
    }
    this.nextBefore = data.next_before;
    const focused = document.activeElement === this.older;
    this.show([...this.items, ...data[this.field]]);
    // The button goes with the last page: the list keeps the keyboard's place.
    if (focused && this.older.hidden) this.focus.focus();
  }

  // Say `key` under the list (its own words only: a load that works clears
  // them, not what the list's owner said there).
  tell(key, fallback = undefined) {
    this.told = key;
    say(this.problem, key, {}, fallback);
  }

  // Take back what this list said, unless its owner has said something
  // else there since (a recording's delete or play error).
  forget() {
    if (this.told && this.problem.dataset.i18n === this.told) say(this.problem, "");
    this.told = null;
  }
}
