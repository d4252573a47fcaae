// The therapist's recordings on the dashboard: play one in the page (the
// server decrypts the byte ranges the player asks for, nothing is cached),
// download it, or delete it for good. The server sends a page at a time
// (newest first); "Older recordings" adds the next.
import { formatDuration, formatTime, say, t } from "./i18n.js";

export class RecordingsList {
  constructor({ api, table, empty, older, player, video, caption, close, problem }) {
    Object.assign(this, { api, table, empty, older, player, video, caption, problem });
    this.recordings = [];
    // The next page's `before`, or null when the list is whole.
    this.nextBefore = null;
    // Each load counts one up: a page that comes after a later load began is
    // not shown (it belongs to the list as it was).
    this.generation = 0;
    this.loading = Promise.resolve();
    this.playing = null;
    close.addEventListener("click", () => this.close());
    older.addEventListener("click", () => this.loadOlder());
    video.addEventListener("error", () => {
      if (this.playing) say(this.problem, "app.recordings.playError");
    });
  }

  // The first page again, and as many more as were shown (a delete or a new
  // consult keeps the therapist's place in the list).
  load() {
    const generation = ++this.generation;
    this.loading = this.fetchPages(generation, Math.max(this.recordings.length, 1));
    return this.loading;
  }

  async fetchPages(generation, wanted) {
    let data = await this.api("GET", "/api/recordings");
    let recordings = data.recordings;
    while (data.next_before && recordings.length < wanted && generation === this.generation) {
      data = await this.api("GET", this.pageAfter(data.next_before));
      recordings = [...recordings, ...data.recordings];
    }
    if (generation !== this.generation) return; // a later load shows its own
    this.nextBefore = data.next_before;
    this.render(recordings);
  }

  pageAfter(before) {
    return `/api/recordings?before=${encodeURIComponent(before)}`;
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
        // Its last row was deleted elsewhere (another tab, the retention purge).
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
    this.render([...this.recordings, ...data.recordings]);
    // The button goes with the last page: the list keeps the keyboard's place.
    if (focused && this.older.hidden) this.table.focus();
  }

  render(recordings = this.recordings) {
    this.recordings = recordings;
    this.empty.hidden = recordings.length > 0;
    this.table.hidden = recordings.length === 0;
    this.older.hidden = !this.nextBefore;
    const body = this.table.tBodies[0];
    body.replaceChildren();
    for (const recording of recordings) {
      const row = body.insertRow();
      row.dataset.recording = recording.id;
      row.insertCell().textContent = formatTime(recording.created_at, true);
      row.insertCell().textContent =
        recording.duration_s === null ? "" : formatDuration(Math.round(recording.duration_s));
      const status = row.insertCell();
      status.textContent = t(`app.recordings.status.${recording.status}`);
      status.className = `status recording-${recording.status}`;
      const actions = row.insertCell();
      actions.className = "row-actions";
      if (recording.status === "recording") continue;
      const download = document.createElement("a");
      download.className = "button small secondary";
      download.href = `/api/recordings/${recording.id}/download`;
      download.textContent = t("app.recordings.download");
      actions.append(
        this.button("app.recordings.play", () => this.play(recording)),
        download,
        this.button("app.recordings.delete", () => this.remove(recording), "danger"),
      );
    }
  }

  button(key, action, kind = "") {
    const element = document.createElement("button");
    element.type = "button";
    element.className = `small ${kind}`.trim();
    element.textContent = t(key);
    element.addEventListener("click", action);
    return element;
  }

  play(recording) {
    this.playing = recording;
    say(this.problem, "");
    this.caption.textContent = t("app.recordings.playing", {
      time: formatTime(recording.created_at, true),
    });
    this.video.src = `/api/recordings/${recording.id}/media`;
    this.player.hidden = false;
    this.video.focus();
    this.video.play().catch(() => {});
  }

  close() {
    this.playing = null;
    this.video.pause();
    this.video.removeAttribute("src");
    this.video.load();
    this.player.hidden = true;
  }

  async remove(recording) {
    if (!confirm(t("app.recordings.deleteConfirm"))) return;
    if (this.playing && this.playing.id === recording.id) this.close();
    try {
      await this.api("DELETE", `/api/recordings/${recording.id}`);
    } catch (error) {
      say(this.problem, `apiError.${error.code}`, {}, error.fallback || error.message);
    }
    await this.load();
  }
}
